//! What one delivery attempt to one recipient came to, as a type.

/// The classified result of handing one envelope to a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The relay accepted the message (2xx after DATA).
    Delivered,
    /// 4xx, connection, TLS or timeout: try again later (or another relay).
    Transient,
    /// 5xx for this recipient: do not try again.
    Permanent,
}

/// One attempt, as recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub relay: String,
    pub outcome: Outcome,
    pub smtp_code: Option<u16>,
    pub enhanced_code: Option<String>,
    pub response: String,
    pub duration_ms: i64,
}

impl Attempt {
    /// A hard bounce: the address itself is bad (RFC 3463 5.1.x, 5.2.1),
    /// so it goes on the suppression list.
    pub fn is_hard_bounce(&self) -> bool {
        if self.outcome != Outcome::Permanent {
            return false;
        }
        match &self.enhanced_code {
            Some(code) => code.starts_with("5.1.") || code == "5.2.1",
            None => matches!(self.smtp_code, Some(550) | Some(551) | Some(553)),
        }
    }

    /// Splits "5.1.1 User unknown" into its enhanced status code and text.
    pub fn split_enhanced(text: &str) -> (Option<String>, String) {
        let trimmed = text.trim();
        let first = trimmed.split_whitespace().next().unwrap_or("");
        let parts: Vec<&str> = first.split('.').collect();
        let looks_enhanced = parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.chars().all(|c| c.is_ascii_digit()));
        if looks_enhanced {
            (Some(first.to_string()), trimmed.to_string())
        } else {
            (None, trimmed.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn permanent(enhanced: Option<&str>, code: u16) -> Attempt {
        Attempt {
            relay: "r".into(),
            outcome: Outcome::Permanent,
            smtp_code: Some(code),
            enhanced_code: enhanced.map(str::to_string),
            response: String::new(),
            duration_ms: 0,
        }
    }

    #[test]
    fn hard_bounces() {
        assert!(permanent(Some("5.1.1"), 550).is_hard_bounce());
        assert!(permanent(Some("5.2.1"), 550).is_hard_bounce());
        assert!(!permanent(Some("5.7.1"), 554).is_hard_bounce());
        assert!(!permanent(Some("5.2.2"), 552).is_hard_bounce());
        assert!(permanent(None, 550).is_hard_bounce());
    }

    #[test]
    fn enhanced_codes() {
        assert_eq!(
            Attempt::split_enhanced("5.1.1 <x@y> User unknown")
                .0
                .as_deref(),
            Some("5.1.1")
        );
        assert_eq!(Attempt::split_enhanced("Requested action aborted").0, None);
    }
}
