//! A message with secret variables is stored as its redacted MIME plus a
//! small patch, line by line, that turns it into the MIME actually sent.
//! Dropping the patch when the message is final leaves only the redacted
//! copy, without rewriting kilobytes of MIME (see docs/decisions.md).
//!
//! Patch format, one record per line: `=N` copies N lines of the redacted
//! MIME, `-N` skips N of them, `+text` inserts one line (`text` keeps its own
//! line ending), `>text` inserts a last line that had none. Applying a patch
//! reproduces the sent MIME byte for byte.

use similar::{capture_diff_slices, Algorithm, DiffOp};

#[derive(Debug, thiserror::Error)]
#[error("the MIME patch does not fit its redacted copy: {0}")]
pub struct PatchError(&'static str);

fn lines(text: &str) -> Vec<&str> {
    text.split_inclusive('\n').collect()
}

/// The patch that turns `redacted` into `sent`.
pub fn diff(redacted: &str, sent: &str) -> String {
    let (old, new) = (lines(redacted), lines(sent));
    let mut patch = String::new();
    for op in capture_diff_slices(Algorithm::Myers, &old, &new) {
        match op {
            DiffOp::Equal { len, .. } => patch.push_str(&format!("={len}\n")),
            DiffOp::Delete { old_len, .. } => patch.push_str(&format!("-{old_len}\n")),
            DiffOp::Insert {
                new_index, new_len, ..
            } => insert(&mut patch, &new[new_index..new_index + new_len]),
            DiffOp::Replace {
                old_len,
                new_index,
                new_len,
                ..
            } => {
                patch.push_str(&format!("-{old_len}\n"));
                insert(&mut patch, &new[new_index..new_index + new_len]);
            }
        }
    }
    patch
}

fn insert(patch: &mut String, lines: &[&str]) {
    for line in lines {
        if line.ends_with('\n') {
            patch.push('+');
            patch.push_str(line);
        } else {
            patch.push('>');
            patch.push_str(line);
            patch.push('\n');
        }
    }
}

/// The sent MIME, from its redacted copy and the patch.
pub fn apply(redacted: &str, patch: &str) -> Result<String, PatchError> {
    let mut source = redacted.split_inclusive('\n');
    let mut out = String::with_capacity(redacted.len() + patch.len());
    for record in patch.split_inclusive('\n') {
        let (op, rest) = record
            .split_at_checked(1)
            .ok_or(PatchError("empty record"))?;
        match op {
            "+" => out.push_str(rest),
            ">" => out.push_str(rest.strip_suffix('\n').unwrap_or(rest)),
            "=" | "-" => {
                let n: usize = rest
                    .trim_end()
                    .parse()
                    .map_err(|_| PatchError("bad count"))?;
                for _ in 0..n {
                    let line = source.next().ok_or(PatchError("too short"))?;
                    if op == "=" {
                        out.push_str(line);
                    }
                }
            }
            _ => return Err(PatchError("unknown record")),
        }
    }
    if source.next().is_some() {
        return Err(PatchError("too long"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(redacted: &str, sent: &str) -> String {
        let patch = diff(redacted, sent);
        assert_eq!(apply(redacted, &patch).unwrap(), sent, "patch {patch:?}");
        patch
    }

    #[test]
    fn applying_the_diff_gives_back_the_sent_text_exactly() {
        let redacted =
            "Subject: hi\r\n\r\nYour code is [redacted]=\r\n.\r\n<p>[redacted]</p>\r\n--b--\r\n";
        let sent = "DKIM-Signature: v=1\r\nSubject: hi\r\n\r\nYour code is 493817.\r\n<p>493817</p>\r\n--b--\r\n";
        let patch = round_trip(redacted, sent);
        assert!(patch.contains("493817"));
        assert!(
            !patch.contains("Subject"),
            "equal lines are counted: {patch:?}"
        );
        round_trip("", "");
        round_trip("a\n", "");
        round_trip("", "a");
        round_trip("a\nb", "a\nc");
        round_trip("a\nb\n", "a\nb");
        round_trip("x\r\n+y\r\n>z", "+x\r\n=1\r\n-2");
    }

    #[test]
    fn a_patch_for_another_copy_is_refused() {
        let patch = diff("a\nb\n", "a\nc\n");
        assert!(apply("a\n", &patch).is_err());
        assert!(apply("a\nb\nextra\n", &patch).is_err());
        assert!(apply("a\nb\n", "?1\n").is_err());
        assert!(apply("a\nb\n", "=x\n").is_err());
    }
}
