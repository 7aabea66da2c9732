//! Building the MIME message handed to relays: headers with RFC 2047
//! encoded display names, IDN domains in ASCII, multipart/alternative text +
//! HTML, attachments, a stable Message-ID, a DKIM signature when the From
//! domain has a key. Bcc never appears in the headers.

use std::time::SystemTime;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment as MimeAttachment, Body, MultiPart, SinglePart};
use lettre::Message;

use super::dkim::DkimSigner;
use super::request::Attachment;
use super::transfer;
use crate::domain::{mime_patch, Mailbox};
use crate::templates::Rendered;

pub struct Envelope<'a> {
    pub from: &'a Mailbox,
    pub to: &'a [Mailbox],
    pub cc: &'a [Mailbox],
    pub reply_to: &'a [Mailbox],
    pub headers: &'a [(String, String)],
    pub attachments: &'a [Attachment],
    pub message_id: &'a str,
    pub date: SystemTime,
    /// Stem of the multipart boundaries. A message and its redacted copy
    /// share it, so that they differ only where the secrets are.
    pub boundary: &'a str,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot build the message: {0}")]
pub struct ComposeError(String);

fn err(e: impl std::fmt::Display) -> ComposeError {
    ComposeError(e.to_string())
}

/// The transfer-encoded text and HTML parts of a rendering (a message with
/// neither gets an empty text part).
#[derive(Clone)]
struct Parts {
    text: Option<Body>,
    html: Option<Body>,
}

impl Parts {
    fn encode(rendered: &Rendered) -> Self {
        let text = match (&rendered.text, &rendered.html) {
            (None, None) => Some(""),
            (text, _) => text.as_deref(),
        };
        Parts {
            text: text.map(transfer::encode),
            html: rendered.html.as_deref().map(transfer::encode),
        }
    }

    fn body(self, boundary: &str) -> Result<MultiPart, SinglePart> {
        match (self.text, self.html) {
            (Some(text), Some(html)) => Ok(MultiPart::alternative()
                .boundary(format!("{boundary}-alt"))
                .singlepart(SinglePart::plain(text))
                .singlepart(SinglePart::html(html))),
            (_, Some(html)) => Err(SinglePart::html(html)),
            (text, None) => Err(SinglePart::plain(
                text.unwrap_or_else(|| transfer::encode("")),
            )),
        }
    }
}

/// The SMTP envelope lettre would otherwise derive by parsing the headers
/// it has just written (From, To, Cc). Never used to send: delivery takes
/// the envelope from the stored recipients.
fn envelope(
    from: &lettre::message::Mailbox,
    to: &[lettre::message::Mailbox],
    cc: &[lettre::message::Mailbox],
) -> Result<lettre::address::Envelope, ComposeError> {
    let mut rcpt: Vec<lettre::Address> = to.iter().chain(cc).map(|m| m.email.clone()).collect();
    if rcpt.is_empty() {
        // Bcc only: lettre's envelope needs a recipient; the From address
        // stands in (as above, it is never used to send).
        rcpt.push(from.email.clone());
    }
    lettre::address::Envelope::new(Some(from.email.clone()), rcpt).map_err(err)
}

fn lettre_list(list: &[Mailbox]) -> Result<Vec<lettre::message::Mailbox>, ComposeError> {
    list.iter().map(|m| m.to_lettre().map_err(err)).collect()
}

/// The message as bytes (ASCII: every part is transfer-encoded).
/// Signed with DKIM when `dkim` has a key for the From domain.
pub fn compose(
    e: &Envelope<'_>,
    rendered: &Rendered,
    dkim: Option<&DkimSigner>,
) -> Result<String, ComposeError> {
    build(e, &rendered.subject, Parts::encode(rendered), dkim)
}

/// A message with secret variables: the MIME sent, and the copy shown
/// instead (the same message rendered with the secrets masked, unsigned)
/// with the patch that turns it into the MIME sent.
pub struct WithRedacted {
    pub sent: String,
    pub shown: String,
    pub patch: String,
}

/// [`compose`] for a message and its redacted rendering. The copy is
/// usually the sent MIME with its DKIM-Signature taken out and the parts
/// that differ swapped for their masked encodings, so the message is
/// composed once; when the two differ elsewhere (the subject, or a part's
/// transfer encoding), the copy is composed on its own and compared.
pub fn compose_with_redacted(
    e: &Envelope<'_>,
    rendered: &Rendered,
    redacted: &Rendered,
    dkim: Option<&DkimSigner>,
) -> Result<WithRedacted, ComposeError> {
    let (sent_parts, shown_parts) = (Parts::encode(rendered), Parts::encode(redacted));
    let sent = build(e, &rendered.subject, sent_parts.clone(), dkim)?;
    if rendered.subject == redacted.subject {
        if let Some((shown, patch)) = splice_redacted(&sent, &sent_parts, &shown_parts) {
            return Ok(WithRedacted { sent, shown, patch });
        }
    }
    let shown = build(e, &redacted.subject, shown_parts, None)?;
    let patch = mime_patch::diff(&shown, &sent);
    Ok(WithRedacted { sent, shown, patch })
}

/// The redacted copy of `sent` and its patch, by splicing; `None` when the
/// copy cannot be had that way.
fn splice_redacted(
    sent: &str,
    sent_parts: &Parts,
    shown_parts: &Parts,
) -> Option<(String, String)> {
    let header_end = sent.find("\r\n\r\n")?;
    let mut edits = Vec::new();
    edits.extend(dkim_header(sent, header_end).map(|range| mime_patch::Edit {
        sent: range,
        shown: "",
    }));
    // Each part's body follows its headers' blank line and ends in CRLF;
    // the parts come in order after the message's header block.
    let mut from = header_end;
    let pairs = [
        (&sent_parts.text, &shown_parts.text),
        (&sent_parts.html, &shown_parts.html),
    ];
    for pair in pairs {
        let (sent_part, shown_part) = match pair {
            (Some(a), Some(b)) if a.encoding() == b.encoding() => (a, b),
            (None, None) => continue,
            _ => return None,
        };
        let body = std::str::from_utf8(sent_part.as_ref()).ok()?;
        let at = body_at(sent, from, body)?;
        from = at + body.len();
        let shown_body = std::str::from_utf8(shown_part.as_ref()).ok()?;
        if let Some((head, tail)) = differing_middle(body, shown_body) {
            edits.push(mime_patch::Edit {
                sent: at + head..from - tail,
                shown: &shown_body[head..shown_body.len() - tail],
            });
        }
    }
    let (shown, patch) = mime_patch::splice(sent, &edits);
    // The patch is what delivery sends: proven here, or not used.
    (mime_patch::apply(&shown, &patch).ok()? == sent).then_some((shown, patch))
}

/// Where `body` starts as a part's body at or after `from`: after a blank
/// line, followed by CRLF. (Checked at each blank line: a searcher built for
/// a kilobytes-long needle cost more than the compose it saved.)
fn body_at(sent: &str, from: usize, body: &str) -> Option<usize> {
    let mut at = from;
    loop {
        at += sent[at..].find("\r\n\r\n")? + 4;
        let rest = &sent[at..];
        if rest.starts_with(body) && rest[body.len()..].starts_with("\r\n") {
            return Some(at);
        }
        at -= 2;
    }
}

/// How many bytes two different texts share at their start and at their
/// end (not overlapping, on character boundaries), so that only the middle
/// is swapped and the patch holds only the lines around it; `None` when they
/// are the same.
fn differing_middle(a: &str, b: &str) -> Option<(usize, usize)> {
    if a == b {
        return None;
    }
    let shared = |x: &[u8], y: &[u8]| x.iter().zip(y).take_while(|(p, q)| p == q).count();
    let mut head = shared(a.as_bytes(), b.as_bytes());
    while !(a.is_char_boundary(head) && b.is_char_boundary(head)) {
        head -= 1;
    }
    let room = a.len().min(b.len()) - head;
    let (ra, rb) = (a.as_bytes().iter().rev(), b.as_bytes().iter().rev());
    let mut tail = ra.zip(rb).take_while(|(p, q)| p == q).count().min(room);
    while !(a.is_char_boundary(a.len() - tail) && b.is_char_boundary(b.len() - tail)) {
        tail -= 1;
    }
    Some((head, tail))
}

/// The DKIM-Signature header's lines (folded lines included) in the header
/// block that ends at `header_end`.
fn dkim_header(sent: &str, header_end: usize) -> Option<std::ops::Range<usize>> {
    let headers = &sent[..header_end + 2];
    let start = if headers.starts_with("DKIM-Signature:") {
        0
    } else {
        headers.find("\r\nDKIM-Signature:")? + 2
    };
    let mut end = start;
    loop {
        end += headers[end..].find("\r\n")? + 2;
        if !headers[end..].starts_with([' ', '\t']) {
            return Some(start..end);
        }
    }
}

fn build(
    e: &Envelope<'_>,
    subject: &str,
    parts: Parts,
    dkim: Option<&DkimSigner>,
) -> Result<String, ComposeError> {
    let from = e.from.to_lettre().map_err(err)?;
    let (to, cc) = (lettre_list(e.to)?, lettre_list(e.cc)?);
    let mut builder = Message::builder()
        .envelope(envelope(&from, &to, &cc)?)
        .from(from)
        .subject(subject)
        .message_id(Some(e.message_id.to_string()))
        .date(e.date);
    for m in to {
        builder = builder.to(m);
    }
    for m in cc {
        builder = builder.cc(m);
    }
    for m in e.reply_to {
        builder = builder.reply_to(m.to_lettre().map_err(err)?);
    }
    for (name, value) in e.headers {
        let name = HeaderName::new_from_ascii(name.clone()).map_err(err)?;
        builder = builder.raw_header(HeaderValue::new(name, value.clone()));
    }
    let mut message = if e.attachments.is_empty() {
        match parts.body(e.boundary) {
            Ok(multi) => builder.multipart(multi),
            Err(single) => builder.singlepart(single),
        }
    } else {
        let mixed_part = || MultiPart::mixed().boundary(format!("{}-mix", e.boundary));
        let mut mixed = match parts.body(e.boundary) {
            Ok(multi) => mixed_part().multipart(multi),
            Err(single) => mixed_part().singlepart(single),
        };
        for a in e.attachments {
            let content_type = ContentType::parse(&a.content_type).map_err(err)?;
            mixed = mixed.singlepart(
                MimeAttachment::new(a.filename.clone()).body(a.content.clone(), content_type),
            );
        }
        builder.multipart(mixed)
    }
    .map_err(err)?;
    if let Some(dkim) = dkim {
        dkim.sign(&mut message, e.from.email.ascii_domain());
    }
    String::from_utf8(message.formatted()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An envelope with the given parties, nothing else set, and a fixed
    /// Message-ID and boundary stem.
    fn envelope<'a>(
        from: &'a Mailbox,
        to: &'a [Mailbox],
        attachments: &'a [Attachment],
    ) -> Envelope<'a> {
        Envelope {
            from,
            to,
            cc: &[],
            reply_to: &[],
            headers: &[],
            attachments,
            message_id: "<abc@acme.test>",
            date: SystemTime::now(),
            boundary: "b0123",
        }
    }

    #[test]
    fn unicode_headers_are_encoded_and_bcc_absent() {
        let from = Mailbox::parse("Acme <no-reply@acme.test>").unwrap();
        let to = vec![Mailbox::parse("李雷 <lilei@例子.中国>").unwrap()];
        let headers = [("X-Entity-Ref-ID".into(), "user-42".into())];
        let e = Envelope {
            headers: &headers,
            ..envelope(&from, &to, &[])
        };
        let rendered = Rendered {
            subject: "验证码".into(),
            html: Some("<p>你好</p>".into()),
            text: Some("你好".into()),
        };
        let mime = compose(&e, &rendered, None).unwrap();
        assert!(mime.is_ascii());
        assert!(mime.contains("xn--fsqu00a.xn--fiqs8s"));
        assert!(mime.contains("=?utf-8?"));
        assert!(mime.contains("Message-ID: <abc@acme.test>"));
        assert!(mime.contains("X-Entity-Ref-ID: user-42"));
        assert!(mime.contains("multipart/alternative"));
        assert!(mime.contains("b0123-alt"));
        assert!(!mime.to_lowercase().contains("\nbcc:"));
    }

    fn rendering(subject: &str, text: Option<&str>, html: Option<&str>) -> Rendered {
        Rendered {
            subject: subject.into(),
            text: text.map(str::to_string),
            html: html.map(str::to_string),
        }
    }

    /// The copy and patch [`compose_with_redacted`] gives are the ones
    /// composing the redacted rendering on its own and comparing gave; says
    /// whether splicing made them.
    fn same_as_composed_twice(
        e: &Envelope<'_>,
        sent: &Rendered,
        redacted: &Rendered,
        dkim: Option<&DkimSigner>,
    ) -> bool {
        let made = compose_with_redacted(e, sent, redacted, dkim).unwrap();
        // (Without the signature, whose `t=` may have ticked in between.)
        let unsigned = |mut mime: String| {
            if let Some(range) = mime
                .find("\r\n\r\n")
                .and_then(|end| dkim_header(&mime, end))
            {
                mime.replace_range(range, "");
            }
            mime
        };
        assert_eq!(
            unsigned(made.sent.clone()),
            unsigned(compose(e, sent, dkim).unwrap())
        );
        assert_eq!(made.shown, compose(e, redacted, None).unwrap());
        assert_eq!(
            mime_patch::apply(&made.shown, &made.patch).unwrap(),
            made.sent
        );
        assert_eq!(dkim.is_some(), made.sent.contains("\r\nDKIM-Signature: "));
        let (sent_parts, shown_parts) = (Parts::encode(sent), Parts::encode(redacted));
        sent.subject == redacted.subject
            && splice_redacted(&made.sent, &sent_parts, &shown_parts).is_some()
    }

    #[test]
    fn the_redacted_copy_is_spliced_exactly_as_if_composed_again() {
        let dir = std::env::temp_dir().join(format!("mailroom-compose-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let signer = super::super::dkim::testing::signer(
            &dir,
            "acme.test",
            super::super::dkim::testing::ED25519_PEM,
        );
        let from = Mailbox::parse("Acme <no-reply@acme.test>").unwrap();
        let to = vec![Mailbox::parse("李雷 <lilei@例子.中国>").unwrap()];
        let attachments = vec![Attachment {
            filename: "a.txt".into(),
            content_type: "text/plain".into(),
            content: b"Your code is 493817\n".to_vec(),
        }];
        let envelope = |attachments| Envelope {
            date: SystemTime::UNIX_EPOCH,
            ..envelope(&from, &to, attachments)
        };
        let long = format!("{}493817{}", "x".repeat(70), "y".repeat(200));
        let masked = format!("{}******{}", "x".repeat(70), "y".repeat(200));
        let code = |c: &str| format!("<p>Your code is <b>{c}</b></p>\n<p>Thanks</p>\n");
        let spliced_cases = [
            (
                rendering("Code", Some("Your code is 493817\n"), Some(&code("493817"))),
                rendering("Code", Some("Your code is ******\n"), Some(&code("******"))),
            ),
            (
                rendering("验证码", Some("您的验证码 493817\n"), None),
                rendering("验证码", Some("您的验证码 ******\n"), None),
            ),
            (
                rendering("Code", None, Some(&code("493817"))),
                rendering("Code", None, Some(&code("******"))),
            ),
            (
                rendering("Code", Some(&long), Some("same\n")),
                rendering("Code", Some(&masked), Some("same\n")),
            ),
            (
                rendering("Code", Some("same"), Some("same")),
                rendering("Code", Some("same"), Some("same")),
            ),
            (rendering("Code", None, None), rendering("Code", None, None)),
        ];
        // Only the lines around a secret are in the patch.
        let (sent, redacted) = &spliced_cases[0];
        let made = compose_with_redacted(&envelope(&[]), sent, redacted, None).unwrap();
        assert_eq!(made.patch.matches('+').count(), 2, "{}", made.patch);
        for (sent, redacted) in &spliced_cases {
            for dkim in [None, Some(&signer)] {
                for e in [envelope(&[]), envelope(&attachments)] {
                    assert!(same_as_composed_twice(&e, sent, redacted, dkim));
                }
            }
        }
        // A secret in the subject, or a part whose masked text takes
        // another transfer encoding: composed twice.
        let composed_twice = [
            (
                rendering("Code 493817", Some("x"), None),
                rendering("Code ******", Some("x"), None),
            ),
            (
                rendering("Code", Some("Your code is 四九三八一七"), None),
                rendering("Code", Some("Your code is ******"), None),
            ),
        ];
        for (sent, redacted) in &composed_twice {
            for dkim in [None, Some(&signer)] {
                assert!(!same_as_composed_twice(
                    &envelope(&[]),
                    sent,
                    redacted,
                    dkim
                ));
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn the_built_in_code_templates_are_composed_once() {
        let engine = crate::templates::TemplateEngine::new();
        let from = Mailbox::parse("Acme <no-reply@acme.test>").unwrap();
        let to = vec![Mailbox::parse("Bench User <user1@example.com>").unwrap()];
        let e = envelope(&from, &to, &[]);
        for t in crate::templates::builtins() {
            let data = serde_json::json!({ t.secret[0].clone(): "004217", "name": "Bench User", "product": "Acme" });
            let sent = engine.render(&t, &data).unwrap();
            let safe = crate::templates::redacted_data(&t.secret, &data).unwrap();
            let redacted = engine.render(&t, &safe).unwrap();
            assert!(
                same_as_composed_twice(&e, &sent, &redacted, None),
                "{} {}",
                t.name,
                t.locale
            );
        }
    }

    #[test]
    fn a_message_for_bcc_recipients_only_has_no_to_or_cc_header() {
        let from = Mailbox::parse("Acme <no-reply@acme.test>").unwrap();
        let e = envelope(&from, &[], &[]);
        let rendered = Rendered {
            subject: "Hi".into(),
            html: None,
            text: Some("Hello".into()),
        };
        let mime = compose(&e, &rendered, None).unwrap().to_lowercase();
        assert!(mime.contains("from: acme <no-reply@acme.test>"));
        assert!(!mime.contains("\r\nto:") && !mime.contains("\r\ncc:") && !mime.contains("bcc"));
    }
}
