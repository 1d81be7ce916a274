//! libpq connection strings: the URL form and the key=value form, read far
//! enough to take out the TLS parameters rekey handles itself.

use super::connect::ConnectError;

/// The TLS parameters rekey handles itself, and the rest of the connection
/// string for tokio-postgres (which rejects `sslrootcert` and the `verify-*` modes).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TlsParams {
    /// The connection string without `sslmode` and `sslrootcert`.
    pub(super) rest: String,
    /// `sslmode`, if given.
    pub(super) sslmode: Option<String>,
    /// `sslrootcert`, if given.
    pub(super) sslrootcert: Option<String>,
    /// `service`: a section of the connection service file.
    pub(super) service: Option<String>,
    /// `passfile`: the password file.
    pub(super) passfile: Option<String>,
}

/// Takes `sslmode` and `sslrootcert` out of a URL's query or a key=value
/// string, parsing as tokio-postgres does (the last of repeated keys wins).
/// A string it cannot read is passed on whole, for tokio-postgres to report.
pub(super) fn take_tls_params(url: &str) -> Result<TlsParams, ConnectError> {
    let mut out = TlsParams::default();
    let mut keep = |key: &str, value: String| match key {
        "sslmode" => {
            out.sslmode = Some(value);
            false
        }
        "sslrootcert" => {
            out.sslrootcert = Some(value);
            false
        }
        "service" => {
            out.service = Some(value);
            false
        }
        "passfile" => {
            out.passfile = Some(value);
            false
        }
        _ => true,
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // tokio-postgres reads credentials up to the first '@', then the query after the next '?'.
        let after_credentials = url.find('@').map_or(0, |at| at + 1);
        match url[after_credentials..]
            .find('?')
            .map(|q| after_credentials + q)
        {
            None => url.to_string(),
            Some(q) => {
                let mut kept = Vec::new();
                for pair in url[q + 1..].split('&') {
                    let Some((key, value)) = pair.split_once('=') else {
                        kept.push(pair);
                        continue;
                    };
                    let key = percent_decode(key)?;
                    if !matches!(
                        key.as_str(),
                        "sslmode" | "sslrootcert" | "service" | "passfile"
                    ) || keep(&key, percent_decode(value)?)
                    {
                        kept.push(pair);
                    }
                }
                match kept.is_empty() {
                    true => url[..q].to_string(),
                    false => format!("{}?{}", &url[..q], kept.join("&")),
                }
            }
        }
    } else {
        match key_values(url) {
            None => url.to_string(),
            Some(pairs) => pairs
                .into_iter()
                .filter_map(|(key, value)| {
                    keep(&key, value.clone()).then(|| {
                        format!(
                            "{key}='{}'",
                            value.replace('\\', "\\\\").replace('\'', "\\'")
                        )
                    })
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    };
    out.rest = rest;
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ConnectError> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| {
            ConnectError::BadUrl("a URL parameter is not UTF-8 once percent-decoded".into())
        })
}

/// Reads a libpq key=value string: `key = value` pairs separated by
/// whitespace, values bare or in single quotes, backslash escaping one
/// character. None when the string is not well formed.
fn key_values(s: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return chars.peek().is_none().then_some(pairs);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        chars.next_if_eq(&'=')?;
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next()? {
                    '\'' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                match c {
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::str::FromStr;

    use tokio_postgres::Config;

    #[test]
    fn url_tls_parameters_are_taken_out_and_the_rest_kept() {
        let p = take_tls_params("postgres://u:p%3F@h:5432/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem").unwrap();
        assert_eq!(p.rest, "postgres://u:p%3F@h:5432/db?application_name=x");
        assert_eq!(p.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/etc/ca dir/ca.pem"));
        let only = take_tls_params("postgresql://h/db?sslmode=require").unwrap();
        assert_eq!(
            (only.rest.as_str(), only.sslmode.as_deref()),
            ("postgresql://h/db", Some("require"))
        );
    }

    #[test]
    fn key_value_tls_parameters_are_taken_out_and_quoted_values_kept() {
        let p = take_tls_params(r"host=h dbname='my db' password='it\'s' sslrootcert = '/ca dir/ca.pem' sslmode=verify-ca").unwrap();
        assert_eq!(p.sslmode.as_deref(), Some("verify-ca"));
        assert_eq!(p.sslrootcert.as_deref(), Some("/ca dir/ca.pem"));
        let config = Config::from_str(&p.rest).unwrap();
        assert_eq!(config.get_dbname(), Some("my db"));
        assert_eq!(config.get_password(), Some(&b"it's"[..]));
    }
}
