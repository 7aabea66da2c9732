//! A message with secret variables is stored as its redacted MIME plus a
//! small patch, line by line, that turns it into the MIME actually sent.
//! Dropping the patch when the message is final leaves only the redacted
//! copy, without rewriting kilobytes of MIME (see docs/decisions.md).
//!
//! Patch format, one record per line: `=N` copies N lines of the redacted
//! MIME, `-N` skips N of them, `+text` inserts one line (`text` keeps its own
//! line ending), `>text` inserts a last line that had none. Applying a patch
//! reproduces the sent MIME byte for byte.

use std::ops::Range;

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

/// A span of the sent MIME that the redacted copy shows otherwise.
pub struct Edit<'a> {
    /// Byte range in the sent MIME.
    pub sent: Range<usize>,
    /// What the redacted copy has there instead.
    pub shown: &'a str,
}

/// Where the line holding byte `at` starts.
fn line_start(text: &str, at: usize) -> usize {
    text[..at].rfind('\n').map_or(0, |i| i + 1)
}

/// Where the line holding byte `at` ends, its line break included (the
/// next line's start), or the end of the text.
fn line_end(text: &str, at: usize) -> usize {
    text[at..].find('\n').map_or(text.len(), |i| at + i + 1)
}

fn at_line_start(text: &str, at: usize) -> bool {
    at == 0 || text.as_bytes()[at - 1] == b'\n'
}

/// The redacted copy of `sent` with `edits` (in order, not overlapping)
/// applied, and the patch that turns it back into `sent`: what [`diff`]
/// would find, without comparing two composed messages. Each edit is widened
/// to whole lines of both copies; edits that share a line form one block.
pub fn splice(sent: &str, edits: &[Edit<'_>]) -> (String, String) {
    let mut shown = String::with_capacity(sent.len());
    let mut patch = String::new();
    let mut copied = 0;
    let mut next = 0;
    while next < edits.len() {
        let start = line_start(sent, edits[next].sent.start).max(copied);
        equal(&mut shown, &mut patch, &sent[copied..start]);
        let mut block = String::new();
        let mut cursor = start;
        let end = loop {
            let edit = &edits[next];
            block.push_str(&sent[cursor..edit.sent.start]);
            block.push_str(edit.shown);
            cursor = edit.sent.end;
            next += 1;
            let open = !(block.is_empty() || block.ends_with('\n'));
            let end = if at_line_start(sent, cursor) && !open {
                cursor
            } else {
                line_end(sent, cursor)
            };
            // A block that ends the text without a line break takes in the
            // edits still to come there.
            let tail = &sent[cursor..end];
            let closed = if tail.is_empty() {
                !open
            } else {
                tail.ends_with('\n')
            };
            if next == edits.len() || (edits[next].sent.start >= end && closed) {
                break end;
            }
        };
        block.push_str(&sent[cursor..end]);
        let replaced = line_count(&block);
        if replaced > 0 {
            patch.push_str(&format!("-{replaced}\n"));
        }
        insert(
            &mut patch,
            &sent[start..end].split_inclusive('\n').collect::<Vec<_>>(),
        );
        shown.push_str(&block);
        copied = end;
    }
    equal(&mut shown, &mut patch, &sent[copied..]);
    (shown, patch)
}

/// Lines in `text`, a last one without its line break included.
fn line_count(text: &str) -> usize {
    let breaks = memchr::memchr_iter(b'\n', text.as_bytes()).count();
    breaks + usize::from(!text.is_empty() && !text.ends_with('\n'))
}

/// Lines both copies share: copied to the redacted one, counted in the patch.
fn equal(shown: &mut String, patch: &mut String, lines: &str) {
    let count = line_count(lines);
    if count > 0 {
        patch.push_str(&format!("={count}\n"));
        shown.push_str(lines);
    }
}

/// The sent MIME, from its redacted copy and the patch.
pub fn apply(redacted: &str, patch: &str) -> Result<String, PatchError> {
    let mut at = 0;
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
                let end = skip_lines(redacted, at, n)?;
                if op == "=" {
                    out.push_str(&redacted[at..end]);
                }
                at = end;
            }
            _ => return Err(PatchError("unknown record")),
        }
    }
    if at < redacted.len() {
        return Err(PatchError("too long"));
    }
    Ok(out)
}

/// Where the `n`th line from byte `at` ends (the last line may lack its
/// line break).
fn skip_lines(text: &str, at: usize, n: usize) -> Result<usize, PatchError> {
    let Some(last) = n.checked_sub(1) else {
        return Ok(at);
    };
    let rest = &text[at..];
    if let Some(i) = memchr::memchr_iter(b'\n', rest.as_bytes()).nth(last) {
        return Ok(at + i + 1);
    }
    // Fewer than `n` line breaks: enough only if the last line lacks one.
    if line_count(rest) == n && !rest.ends_with('\n') {
        Ok(text.len())
    } else {
        Err(PatchError("too short"))
    }
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

    /// `sent` with each `(range, shown)` spliced: the copy must be the
    /// text with the ranges replaced, and the patch must give `sent` back.
    fn spliced(sent: &str, edits: &[(Range<usize>, &str)]) -> (String, String) {
        let edits: Vec<Edit<'_>> = edits
            .iter()
            .map(|(r, s)| Edit {
                sent: r.clone(),
                shown: s,
            })
            .collect();
        let (shown, patch) = splice(sent, &edits);
        let mut expected = String::new();
        let mut at = 0;
        for e in &edits {
            expected.push_str(&sent[at..e.sent.start]);
            expected.push_str(e.shown);
            at = e.sent.end;
        }
        expected.push_str(&sent[at..]);
        assert_eq!(shown, expected);
        assert_eq!(
            apply(&shown, &patch).ok().as_deref(),
            Some(sent),
            "{sent:?} {patch:?} {shown:?}"
        );
        (shown, patch)
    }

    #[test]
    fn a_spliced_copy_and_its_patch_give_back_the_sent_text() {
        let sent = "DKIM-Signature: v=1;\r\n b=x\r\nSubject: hi\r\n\r\nYour code is 493817.\r\n<p>493817</p>\r\n--b--\r\n";
        let dkim = 0..sent.find("Subject").unwrap();
        let code = |n: usize| {
            let at = sent.match_indices("493817").nth(n).unwrap().0;
            at..at + 6
        };
        let (shown, patch) = spliced(
            sent,
            &[(dkim.clone(), ""), (code(0), "******"), (code(1), "******")],
        );
        assert!(!shown.contains("493817") && !shown.contains("DKIM"));
        assert!(
            patch.starts_with("+DKIM") && !patch.contains("Subject"),
            "{patch:?}"
        );
        // Edits on one line, at line ends, at the text's ends, growing or
        // shrinking the line count, and none at all.
        spliced(sent, &[(code(0), "a\r\nb"), (code(1), "")]);
        spliced(sent, &[(0..0, "x\n"), (sent.len()..sent.len(), "y")]);
        spliced(sent, &[(dkim, "A\r\nB\r\nC\r\n")]);
        spliced("a\nb\nc", &[(4..5, "z\n")]);
        spliced("a\nb\nc", &[(2..4, "")]);
        spliced("a\nb\nc", &[(1..2, ""), (3..4, "")]);
        spliced("", &[]);
        spliced("abc", &[]);
        spliced("abc\n", &[(0..4, "")]);
    }

    #[test]
    fn random_splices_round_trip() {
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        let pieces = ["a", "bc", "\n", "\r\n", "", "x\ny"];
        for _ in 0..5000 {
            let sent: String = (0..next(12)).map(|_| pieces[next(pieces.len())]).collect();
            let mut cuts: Vec<usize> = (0..next(6)).map(|_| next(sent.len() + 1)).collect();
            cuts.sort_unstable();
            let edits: Vec<(Range<usize>, &str)> = cuts
                .chunks_exact(2)
                .map(|c| (c[0]..c[1], pieces[next(pieces.len())]))
                .collect();
            spliced(&sent, &edits);
        }
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
