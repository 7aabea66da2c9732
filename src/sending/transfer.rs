//! Content-Transfer-Encoding of text and HTML parts: one pass to choose
//! between 7bit, quoted-printable and base64 (by lettre's own rule), and our
//! own quoted-printable encoder. lettre gets the encoded body as it is: its
//! choice, CRLF scan and the `quoted_printable` crate were an eighth of the
//! accept path's CPU (a part with a secret variable is encoded twice).

use base64::Engine;
use lettre::message::header::ContentTransferEncoding;
use lettre::message::Body;

/// Longest line, CRLF excluded, a part may keep unencoded (lettre's limit,
/// stricter than RFC 5322's 998).
const MAX_PLAIN_LINE: usize = 75;
/// Longest encoded line, CRLF excluded (RFC 2045 §6.7, §6.8).
const MAX_ENCODED_LINE: usize = 76;
const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// What one pass over a CRLF-terminated text found.
struct Survey {
    /// Only ASCII, no NUL, no CR outside CRLF, no line over [`MAX_PLAIN_LINE`].
    plain: bool,
    /// Bytes quoted-printable must escape (CRLF line breaks excluded).
    escaped: usize,
}

fn survey(text: &[u8]) -> Survey {
    let mut plain = true;
    let mut escaped = 0;
    let mut line_start = 0;
    for (i, &b) in text.iter().enumerate() {
        match b {
            b'\n' if i > 0 && text[i - 1] == b'\r' => {
                plain &= i - 1 - line_start <= MAX_PLAIN_LINE;
                line_start = i + 1;
            }
            b'\r' if text.get(i + 1) == Some(&b'\n') => {}
            b'\t' | b' '..=b'~' => {}
            _ => {
                escaped += 1;
                plain &= b.is_ascii() && b != 0 && b != b'\r' && b != b'\n';
            }
        }
    }
    plain &= text.len() - line_start <= MAX_PLAIN_LINE;
    Survey { plain, escaped }
}

/// `text` (lines ending CRLF) as a part body in the most compact safe
/// encoding: 7bit when it needs none, else quoted-printable when at most a
/// third of it needs escaping, else base64.
pub fn encode(text: &str) -> Body {
    let bytes = text.as_bytes();
    let found = survey(bytes);
    if found.plain {
        Body::dangerous_pre_encoded(bytes.to_vec(), ContentTransferEncoding::SevenBit)
    } else if found.escaped <= bytes.len() / 3 {
        Body::dangerous_pre_encoded(
            quoted_printable(bytes),
            ContentTransferEncoding::QuotedPrintable,
        )
    } else {
        Body::dangerous_pre_encoded(base64_lines(bytes), ContentTransferEncoding::Base64)
    }
}

/// Quoted-printable (RFC 2045 §6.7): CRLF stays a hard line break, `=`,
/// controls, 8-bit bytes and whitespace ending a line are escaped, and a
/// soft break (`=` CRLF) keeps every line within 76 characters.
fn quoted_printable(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + text.len() / 4);
    let mut lines = text.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let has_break = lines.peek().is_some();
        let line = match line.strip_suffix(b"\r") {
            Some(content) if has_break => content,
            _ => line,
        };
        quoted_line(line, &mut out);
        if has_break {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

fn quoted_line(line: &[u8], out: &mut Vec<u8>) {
    let mut column = 0;
    let last = line.len().wrapping_sub(1);
    for (i, &b) in line.iter().enumerate() {
        let literal =
            matches!(b, b'!'..=b'<' | b'>'..=b'~') || (matches!(b, b' ' | b'\t') && i != last);
        let width = if literal { 1 } else { 3 };
        // Room for the `=` of a soft break.
        if column + width > MAX_ENCODED_LINE - 1 {
            out.extend_from_slice(b"=\r\n");
            column = 0;
        }
        if literal {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'=', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
        column += width;
    }
}

/// Base64 in lines of 76 characters (RFC 2045 §6.8).
fn base64_lines(bytes: &[u8]) -> Vec<u8> {
    let flat = base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut out = Vec::with_capacity(flat.len() + flat.len() / MAX_ENCODED_LINE * 2 + 2);
    for (i, chunk) in flat.as_bytes().chunks(MAX_ENCODED_LINE).enumerate() {
        if i > 0 {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 2045 quoted-printable decoding, for the round trips below.
    fn decode_qp(encoded: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < encoded.len() {
            match encoded[i] {
                b'=' if encoded[i + 1..].starts_with(b"\r\n") => i += 3,
                b'=' => {
                    let hex = std::str::from_utf8(&encoded[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                }
                b => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        out
    }

    fn check_lines(encoded: &[u8]) {
        for line in encoded.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            assert!(
                line.len() <= MAX_ENCODED_LINE,
                "{:?}",
                String::from_utf8_lossy(line)
            );
            assert!(line.is_ascii());
            assert!(!line.ends_with(b" ") && !line.ends_with(b"\t"));
        }
    }

    #[test]
    fn short_ascii_lines_stay_7bit() {
        let body = encode("Hello,\r\n\r\nYour code is 123456.\r\n");
        assert_eq!(body.encoding(), ContentTransferEncoding::SevenBit);
        assert_eq!(body.as_ref(), b"Hello,\r\n\r\nYour code is 123456.\r\n");
    }

    #[test]
    fn long_lines_and_some_accents_are_quoted_printable() {
        let long = format!(
            "<td style=\"{}\">café = 100%</td> \r\nend\t",
            "x".repeat(150)
        );
        for text in [long.as_str(), "café au lait"] {
            let body = encode(text);
            assert_eq!(
                body.encoding(),
                ContentTransferEncoding::QuotedPrintable,
                "{text:?}"
            );
            assert_eq!(decode_qp(body.as_ref()), text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn quoted_printable_round_trips() {
        for text in [
            "",
            " ",
            "a = b",
            "trailing space \r\nnext",
            "tab\t\r\n\r\n",
            "bare\rcr",
            "=\r\n=",
            "ends with CRLF\r\n",
        ] {
            let encoded = quoted_printable(text.as_bytes());
            check_lines(&encoded);
            assert_eq!(decode_qp(&encoded), text.as_bytes(), "{text:?}");
        }
    }

    #[test]
    fn soft_breaks_never_split_an_escape() {
        // Every column position for a multi-byte character near the limit.
        for pad in 60..80 {
            let text = format!("{}你好=é \r\n", "a".repeat(pad));
            let encoded = quoted_printable(text.as_bytes());
            check_lines(&encoded);
            assert_eq!(decode_qp(&encoded), text.as_bytes());
        }
    }

    #[test]
    fn mostly_non_ascii_text_is_base64() {
        let text = "你好，这是您的验证码：123456。\r\n请勿与他人分享。".repeat(4);
        let body = encode(&text);
        assert_eq!(body.encoding(), ContentTransferEncoding::Base64);
        check_lines(body.as_ref());
        let flat: Vec<u8> = body
            .as_ref()
            .iter()
            .copied()
            .filter(|b| !b"\r\n".contains(b))
            .collect();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(flat)
            .unwrap();
        assert_eq!(decoded, text.as_bytes());
    }

    #[test]
    fn the_choice_is_lettres() {
        let cases = [
            "Hello, World!\r\n".to_string(),
            "Hello, World! 📬".to_string(),
            "Hello! 📬📬📬📬📬📬📬📬📬📬".to_string(),
            format!("{}\r\n", "0123456789".repeat(9)),
        ];
        for text in &cases {
            let lettre = Body::new(text.clone()).encoding();
            assert_eq!(encode(text).encoding(), lettre, "{text:?}");
        }
    }
}
