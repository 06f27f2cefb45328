//! Which browser origins may open realtime connections (`--allowed-origins`).
//!
//! Owns the origin patterns and matching them against an upgrade request's `Origin` header.
//! Browsers always send `Origin` on a WebSocket upgrade and a page cannot forge it, so this is
//! what stops another site's page from connecting with the user's browser; other clients
//! (mobile apps, servers) send none or any they like, so a missing `Origin` is allowed. Pure:
//! it must not know connections or HTTP beyond the header's value.

use std::str::FromStr;

/// One allowed origin: exact (`https://app.example.com`, port included when not the default)
/// or any subdomain (`https://*.example.com`, which does not match `https://example.com`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginPattern {
    scheme: String,
    host: Host,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Exact(String),
    /// `.example.com`: what a matching host must end with.
    Subdomains(String),
}

impl FromStr for OriginPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            format!(
                "invalid origin {s:?}: expected scheme://host[:port], e.g. https://app.example.com \
                 or https://*.example.com"
            )
        };
        let (scheme, host) = s.trim().split_once("://").ok_or_else(invalid)?;
        let valid_host = |h: &str| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'))
        };
        if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(invalid());
        }
        let host = match host.strip_prefix("*.") {
            Some(rest) if valid_host(rest) => {
                Host::Subdomains(format!(".{}", rest.to_ascii_lowercase()))
            }
            None if valid_host(host) => Host::Exact(host.to_ascii_lowercase()),
            _ => return Err(invalid()),
        };
        Ok(Self {
            scheme: scheme.to_ascii_lowercase(),
            host,
        })
    }
}

impl OriginPattern {
    fn matches(&self, scheme: &str, host: &str) -> bool {
        self.scheme == scheme
            && match &self.host {
                Host::Exact(h) => h == host,
                Host::Subdomains(suffix) => {
                    host.len() > suffix.len() && host.ends_with(suffix.as_str())
                }
            }
    }
}

/// The origins allowed to connect; an empty policy allows every origin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    patterns: Vec<OriginPattern>,
}

impl OriginPolicy {
    pub fn new(patterns: Vec<OriginPattern>) -> Self {
        Self { patterns }
    }

    /// Whether a request with this `Origin` header (if any) may connect.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else {
            return true;
        };
        if self.patterns.is_empty() {
            return true;
        }
        let origin = origin.trim().to_ascii_lowercase();
        let Some((scheme, host)) = origin.split_once("://") else {
            return false;
        };
        self.patterns.iter().any(|p| p.matches(scheme, host))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(patterns: &[&str]) -> OriginPolicy {
        OriginPolicy::new(patterns.iter().map(|p| p.parse().unwrap()).collect())
    }

    #[test]
    fn exact_and_subdomain_patterns() {
        let p = policy(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:5173",
        ]);
        assert!(p.allows(Some("https://app.example.com")));
        assert!(p.allows(Some("HTTPS://App.Example.com")));
        assert!(!p.allows(Some("http://app.example.com")), "scheme matters");
        assert!(!p.allows(Some("https://app.example.com.evil.net")));
        assert!(p.allows(Some("https://a.b.example.org")));
        assert!(
            !p.allows(Some("https://example.org")),
            "a subdomain is required"
        );
        assert!(!p.allows(Some("https://badexample.org")));
        assert!(p.allows(Some("http://localhost:5173")));
        assert!(!p.allows(Some("http://localhost:8080")), "ports matter");
        assert!(!p.allows(Some("null")), "sandboxed pages send null");
        assert!(p.allows(None), "non-browser clients send no Origin");
        assert!(OriginPolicy::default().allows(Some("https://anything.example")));
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for bad in [
            "example.com",
            "https://",
            "https://*.",
            "https://a b",
            "://x",
            "https://*",
        ] {
            assert!(bad.parse::<OriginPattern>().is_err(), "{bad}");
        }
    }
}
