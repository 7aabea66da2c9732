//! Building the MIME message handed to relays: headers with RFC 2047
//! encoded display names, IDN domains in ASCII, multipart/alternative text +
//! HTML, attachments, a stable Message-ID, a DKIM signature when the From
//! domain has a key. Bcc never appears in the headers.

use std::time::SystemTime;

use lettre::message::header::{ContentType, HeaderName, HeaderValue};
use lettre::message::{Attachment as MimeAttachment, MultiPart, SinglePart};
use lettre::Message;

use super::dkim::DkimSigner;
use super::request::Attachment;
use super::transfer;
use crate::domain::Mailbox;
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

fn body(rendered: &Rendered, boundary: &str) -> Result<MultiPart, SinglePart> {
    let plain = |text: &str| SinglePart::plain(transfer::encode(text));
    let html = |html: &str| SinglePart::html(transfer::encode(html));
    match (&rendered.text, &rendered.html) {
        (Some(text), Some(markup)) => Ok(MultiPart::alternative()
            .boundary(format!("{boundary}-alt"))
            .singlepart(plain(text))
            .singlepart(html(markup))),
        (Some(text), None) => Err(plain(text)),
        (None, Some(markup)) => Err(html(markup)),
        (None, None) => Err(plain("")),
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
    let from = e.from.to_lettre().map_err(err)?;
    let (to, cc) = (lettre_list(e.to)?, lettre_list(e.cc)?);
    let mut builder = Message::builder()
        .envelope(envelope(&from, &to, &cc)?)
        .from(from)
        .subject(rendered.subject.clone())
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
        match body(rendered, e.boundary) {
            Ok(multi) => builder.multipart(multi),
            Err(single) => builder.singlepart(single),
        }
    } else {
        let mixed_part = || MultiPart::mixed().boundary(format!("{}-mix", e.boundary));
        let mut mixed = match body(rendered, e.boundary) {
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

    #[test]
    fn unicode_headers_are_encoded_and_bcc_absent() {
        let from = Mailbox::parse("Acme <no-reply@acme.test>").unwrap();
        let to = vec![Mailbox::parse("李雷 <lilei@例子.中国>").unwrap()];
        let e = Envelope {
            from: &from,
            to: &to,
            cc: &[],
            reply_to: &[],
            headers: &[("X-Entity-Ref-ID".into(), "user-42".into())],
            attachments: &[],
            message_id: "<abc@acme.test>",
            date: SystemTime::now(),
            boundary: "b0123",
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

    #[test]
    fn a_message_for_bcc_recipients_only_has_no_to_or_cc_header() {
        let from = Mailbox::parse("Acme <no-reply@acme.test>").unwrap();
        let e = Envelope {
            from: &from,
            to: &[],
            cc: &[],
            reply_to: &[],
            headers: &[],
            attachments: &[],
            message_id: "<abc@acme.test>",
            date: SystemTime::now(),
            boundary: "b0123",
        };
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
