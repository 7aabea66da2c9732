//! Email addresses and mailboxes (`Name <local@domain>`), parsed strictly at
//! the edge: no CR/LF/NUL, ASCII local parts (no SMTPUTF8), internationalized
//! domains converted to their ASCII (punycode) form for the envelope.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("is empty")]
    Empty,
    #[error("contains a control character (CR, LF or NUL)")]
    ControlCharacter,
    #[error("is not an email address (expected local@domain)")]
    Shape,
    #[error("has an invalid local part")]
    LocalPart,
    #[error("has a non-ASCII local part (SMTPUTF8 is not supported)")]
    NonAsciiLocalPart,
    #[error("has an invalid domain")]
    Domain,
    #[error("has an unterminated display name or angle bracket")]
    Unbalanced,
}

/// `local@domain`, with the domain kept both as given (Unicode) and as ASCII.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailAddress {
    local: String,
    domain: String,
    ascii_domain: String,
}

impl EmailAddress {
    pub fn parse(text: &str) -> Result<EmailAddress, AddressError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        if has_control(text) {
            return Err(AddressError::ControlCharacter);
        }
        let (local, domain) = text.rsplit_once('@').ok_or(AddressError::Shape)?;
        if local.is_empty() || domain.is_empty() {
            return Err(AddressError::Shape);
        }
        validate_local(local)?;
        let ascii_domain = to_ascii_domain(domain)?;
        Ok(EmailAddress {
            local: local.to_string(),
            domain: domain.to_lowercase(),
            ascii_domain,
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    /// The domain as the client wrote it (lower-cased, Unicode allowed).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The domain in ASCII (IDNA), as used on the wire.
    pub fn ascii_domain(&self) -> &str {
        &self.ascii_domain
    }

    /// The address as used in the SMTP envelope and MIME headers.
    pub fn envelope(&self) -> String {
        format!("{}@{}", self.local, self.ascii_domain)
    }

    /// The canonical key for suppressions and limits (lower-case, ASCII).
    pub fn key(&self) -> String {
        self.envelope().to_lowercase()
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// An address with an optional display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mailbox {
    pub name: Option<String>,
    pub email: EmailAddress,
}

impl Mailbox {
    /// Parses `addr`, `<addr>`, `Name <addr>` or `"Quoted, Name" <addr>`.
    pub fn parse(text: &str) -> Result<Mailbox, AddressError> {
        if has_control(text) {
            return Err(AddressError::ControlCharacter);
        }
        let text = text.trim();
        if text.is_empty() {
            return Err(AddressError::Empty);
        }
        if !text.ends_with('>') {
            if text.contains('<') {
                return Err(AddressError::Unbalanced);
            }
            return Ok(Mailbox {
                name: None,
                email: EmailAddress::parse(text)?,
            });
        }
        let open = text.rfind('<').ok_or(AddressError::Unbalanced)?;
        let addr = &text[open + 1..text.len() - 1];
        let name = unquote(text[..open].trim())?;
        Mailbox::new(name, addr)
    }

    /// From separate parts, as in `{"email": ..., "name": ...}`.
    pub fn new(name: Option<String>, email: &str) -> Result<Mailbox, AddressError> {
        let name = name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
        if name.as_deref().is_some_and(has_control) {
            return Err(AddressError::ControlCharacter);
        }
        Ok(Mailbox {
            name,
            email: EmailAddress::parse(email)?,
        })
    }

    pub fn to_lettre(&self) -> Result<lettre::message::Mailbox, AddressError> {
        let address = lettre::Address::new(self.email.local(), self.email.ascii_domain())
            .map_err(|_| AddressError::Shape)?;
        Ok(lettre::message::Mailbox::new(self.name.clone(), address))
    }
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) if name.chars().any(|c| "()<>[]:;@\\,.\"".contains(c)) => {
                write!(f, "\"{}\" <{}>", name.replace('"', "\\\""), self.email)
            }
            Some(name) => write!(f, "{name} <{}>", self.email),
            None => write!(f, "{}", self.email),
        }
    }
}

fn has_control(text: &str) -> bool {
    text.chars().any(|c| c == '\r' || c == '\n' || c == '\0')
}

fn unquote(name: &str) -> Result<Option<String>, AddressError> {
    if name.is_empty() {
        return Ok(None);
    }
    if let Some(inner) = name.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or(AddressError::Unbalanced)?;
        return Ok(Some(inner.replace("\\\"", "\"").replace("\\\\", "\\")));
    }
    Ok(Some(name.to_string()))
}

fn validate_local(local: &str) -> Result<(), AddressError> {
    if !local.is_ascii() {
        return Err(AddressError::NonAsciiLocalPart);
    }
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let ok = local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local.chars().all(|c| atext(c) || c == '.');
    if ok {
        Ok(())
    } else {
        Err(AddressError::LocalPart)
    }
}

fn to_ascii_domain(domain: &str) -> Result<String, AddressError> {
    let ascii = idna::domain_to_ascii(domain).map_err(|_| AddressError::Domain)?;
    let labels: Vec<&str> = ascii.split('.').collect();
    let label_ok = |l: &&str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    let tld_ok = labels
        .last()
        .is_some_and(|tld| !tld.chars().all(|c| c.is_ascii_digit()));
    if ascii.len() <= 253 && labels.len() >= 2 && labels.iter().all(label_ok) && tld_ok {
        Ok(ascii)
    } else {
        Err(AddressError::Domain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_forms() {
        let m = Mailbox::parse("李雷 <lilei@example.com>").unwrap();
        assert_eq!(m.name.as_deref(), Some("李雷"));
        assert_eq!(m.email.envelope(), "lilei@example.com");
        let m = Mailbox::parse("\"Doe, John\" <j@x.test>").unwrap();
        assert_eq!(m.name.as_deref(), Some("Doe, John"));
        assert_eq!(Mailbox::parse("<a@b.co>").unwrap().name, None);
        assert_eq!(Mailbox::parse("a@b.co").unwrap().email.local(), "a");
    }

    #[test]
    fn idn_domains_become_punycode() {
        let e = EmailAddress::parse("user@例子.中国").unwrap();
        assert_eq!(e.ascii_domain(), "xn--fsqu00a.xn--fiqs8s");
        assert_eq!(e.domain(), "例子.中国");
    }

    #[test]
    fn rejects_bad_addresses() {
        for bad in [
            "",
            "plain",
            "a@",
            "@b.co",
            "a@b",
            "a..b@x.co",
            "a@-x.co",
            "a@x.123",
            "a b@x.co",
            "a@x.co\r\nBcc: v@x.co",
            "李@x.co",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            Mailbox::parse("Eve\r\nBcc: x@y.co <e@x.co>"),
            Err(AddressError::ControlCharacter)
        );
        assert!(Mailbox::parse("Eve <e@x.co").is_err());
    }

    #[test]
    fn lettre_encodes_unicode_names() {
        let m = Mailbox::parse("李雷 <lilei@例子.中国>").unwrap();
        let l = m.to_lettre().unwrap();
        assert_eq!(l.email.to_string(), "lilei@xn--fsqu00a.xn--fiqs8s");
    }
}
