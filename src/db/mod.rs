//! PostgreSQL plumbing below everything else: connections ([`connect`], with
//! TLS in [`tls`], libpq strings in [`conninfo`], and what libpq reads
//! besides them: service file, `PG*` variables, password file), raw binary values
//! ([`raw`], held compactly by the page in [`page`]), binary COPY ([`binary_copy`]), identifier quoting, other sessions' open
//! writes ([`writers`]), and
//! throwaway clusters for tests and benchmarks ([`cluster`]). Uses nothing
//! else of rekey's.

pub mod binary_copy;
pub mod cluster;
pub mod connect;
pub mod conninfo;
pub mod idle;
mod libpq_env;
pub mod page;
pub mod raw;
pub mod session;
pub mod standbys;
pub mod tls;
pub mod writers;

pub use connect::{ConnectError, Database};
pub use page::{Page, PageError, PageRow};
pub use raw::{KeyBytes, RawParam, RawRef};
pub use tls::SslMode;

/// Quotes an identifier for SQL: `my "col"` becomes `"my ""col"""`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    #[test]
    fn quote_ident_doubles_quotes() {
        assert_eq!(super::quote_ident(r#"a "b"; drop"#), r#""a ""b""; drop""#);
    }
}
