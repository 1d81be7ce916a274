//! What libpq reads besides the connection string, so rekey connects where
//! psql would: the connection service file (`service=`, `PGSERVICE`), the
//! `PG*` environment variables, the password file (`passfile=`,
//! `PGPASSFILE`, `~/.pgpass`) and libpq's defaults, each filling only what
//! the ones before it left unset, in libpq's order: the string, then the
//! service, then the environment, then the defaults.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::Config;

use super::connect::ConnectError;

/// Reads an environment variable (a closure, so tests need not touch the process's).
pub(super) type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// A variable's value, if set and not empty (libpq ignores empty ones).
fn var(env: Env<'_>, name: &str) -> Option<String> {
    env(name).filter(|v| !v.is_empty())
}

/// The parameters of service `name`: from `PGSERVICEFILE` (else
/// `~/.pg_service.conf`), else `PGSYSCONFDIR/pg_service.conf`. A service
/// named but found in neither is an error, as in libpq.
pub(super) fn service(name: &str, env: Env<'_>) -> Result<Vec<(String, String)>, ConnectError> {
    let user_file = var(env, "PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| var(env, "HOME").map(|h| Path::new(&h).join(".pg_service.conf")));
    let system_file = var(env, "PGSYSCONFDIR").map(|d| Path::new(&d).join("pg_service.conf"));
    for file in user_file.iter().chain(system_file.iter()) {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some(params) = service_section(&text, name, file)? {
            return Ok(params);
        }
    }
    Err(ConnectError::BadUrl(format!(
        "definition of service \"{name}\" not found (looked in PGSERVICEFILE or ~/.pg_service.conf, and PGSYSCONFDIR/pg_service.conf)"
    )))
}

/// The `key=value` lines of section `[name]`, or None when the file has no such section.
fn service_section(
    text: &str,
    name: &str,
    file: &Path,
) -> Result<Option<Vec<(String, String)>>, ConnectError> {
    let mut inside = false;
    let mut found = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            if inside {
                break;
            }
            inside = section == name;
            if inside {
                found = Some(Vec::new());
            }
            continue;
        }
        if !inside {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(ConnectError::BadUrl(format!(
                "syntax error in service file {}, line {}: expected key=value",
                file.display(),
                n + 1
            )));
        };
        if let Some(params) = found.as_mut() {
            params.push((key.trim().to_string(), value.trim().to_string()));
        }
    }
    Ok(found)
}

/// The last value of `key` in a service's parameters.
pub(super) fn param(service: &[(String, String)], key: &str) -> Option<String> {
    service
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

/// Fills what `config` leaves unset from the service's parameters, then
/// from the environment, then from libpq's defaults (host: the local
/// socket directory when it has the server's socket, else localhost; user:
/// the OS user). The TLS parameters are handled by the caller.
pub(super) fn fill(
    config: &mut Config,
    service: &[(String, String)],
    env: Env<'_>,
) -> Result<(), ConnectError> {
    let from_service = |key: &str| param(service, key);
    let pick = |key: &str, var_name: &str| from_service(key).or_else(|| var(env, var_name));
    if config.get_hosts().is_empty() {
        if let Some(hosts) = pick("host", "PGHOST") {
            for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
                config.host(h);
            }
        }
    }
    if config.get_ports().is_empty() {
        if let Some(ports) = pick("port", "PGPORT") {
            for p in ports.split(',').map(str::trim) {
                let port = p.parse::<u16>().map_err(|_| {
                    ConnectError::BadUrl(format!(
                        "port {p:?} (from the service or PGPORT) is not a port number"
                    ))
                })?;
                config.port(port);
            }
        }
    }
    if config.get_user().is_none() {
        // libpq's default is the OS user; with none, the driver says "user missing"
        if let Some(u) = pick("user", "PGUSER")
            .or_else(|| var(env, "USER"))
            .or_else(|| var(env, "LOGNAME"))
        {
            config.user(&u);
        }
    }
    if config.get_dbname().is_none() {
        if let Some(d) = pick("dbname", "PGDATABASE") {
            config.dbname(&d);
        }
    }
    if config.get_password().is_none() {
        if let Some(p) = pick("password", "PGPASSWORD") {
            config.password(p);
        }
    }
    if config.get_application_name().is_none() {
        if let Some(a) = pick("application_name", "PGAPPNAME") {
            config.application_name(&a);
        }
    }
    if config.get_options().is_none() {
        if let Some(o) = pick("options", "PGOPTIONS") {
            config.options(&o);
        }
    }
    if config.get_connect_timeout().is_none() {
        if let Some(t) = from_service("connect_timeout") {
            let secs = t.parse::<u64>().map_err(|_| {
                ConnectError::BadUrl(format!(
                    "connect_timeout={t} in the service file is not a number of seconds"
                ))
            })?;
            config.connect_timeout(Duration::from_secs(secs.max(2)));
        }
    }
    if config.get_hosts().is_empty() {
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let socket_dir = ["/var/run/postgresql", "/tmp"]
            .into_iter()
            .find(|d| Path::new(d).join(format!(".s.PGSQL.{port}")).exists());
        config.host(socket_dir.unwrap_or("localhost"));
    }
    Ok(())
}

/// The password for `config`'s first host from the password file
/// (`passfile`, else `PGPASSFILE`, else `~/.pgpass`), when `config` has
/// none. As libpq: a file others can read is ignored with a warning, a
/// socket host matches `localhost`, and `*` matches anything.
pub(super) fn password_file(config: &mut Config, passfile: Option<String>, env: Env<'_>) {
    if config.get_password().is_some() {
        return;
    }
    let Some(path) = passfile
        .filter(|p| !p.is_empty())
        .or_else(|| var(env, "PGPASSFILE"))
        .map(PathBuf::from)
        .or_else(|| var(env, "HOME").map(|h| Path::new(&h).join(".pgpass")))
    else {
        return;
    };
    let Ok(meta) = std::fs::metadata(&path) else {
        return;
    };
    if !meta.is_file() {
        tracing::warn!("password file {} is not a plain file", path.display());
        return;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "password file {} has group or world access; permissions should be u=rw (0600) or less",
                path.display()
            );
            return;
        }
    }
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or_default()
        .to_string();
    let user = config.get_user().unwrap_or_default().to_string();
    if let Some(password) = lookup(&text, [&host, &port, &dbname, &user]) {
        config.password(password);
    }
}

/// The password of the first line of a password file whose four fields
/// match `want` (host, port, database, user).
fn lookup(text: &str, want: [&str; 4]) -> Option<String> {
    text.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let fields = split_fields(line);
            let [h, p, d, u, password] = fields.as_slice() else {
                return None;
            };
            [h, p, d, u]
                .iter()
                .zip(want)
                .all(|(field, want)| *field == "*" || *field == want)
                .then(|| password.clone())
        })
}

/// Splits a password-file line on unescaped colons; `\:` and `\\` are
/// literal. The fifth field runs to the end of the line.
fn split_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    if let Some(f) = fields.last_mut() {
                        f.push(next);
                    }
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(f) = fields.last_mut() {
                    f.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_file_line_matches_with_wildcards_and_escapes() {
        let text = "# comment\nother:5432:*:*:nope\n127.0.0.1:*:app:al\\:ice:s3cr\\:et:tail\n";
        assert_eq!(
            lookup(text, ["127.0.0.1", "6543", "app", "al:ice"]).as_deref(),
            Some("s3cr:et:tail")
        );
        assert_eq!(lookup(text, ["127.0.0.1", "6543", "app", "bob"]), None);
        assert_eq!(
            lookup(text, ["other", "5432", "x", "y"]).as_deref(),
            Some("nope")
        );
    }

    #[test]
    fn the_environment_fills_only_what_the_string_leaves_unset() {
        let env = |k: &str| {
            Some(
                match k {
                    "PGHOST" => "db.example,db2.example",
                    "PGPORT" => "6432,6433",
                    "PGUSER" => "envuser",
                    "PGDATABASE" => "envdb",
                    "PGPASSWORD" => "envpw",
                    "PGAPPNAME" => "billing",
                    _ => return None,
                }
                .to_string(),
            )
        };
        let mut c: Config = "user=alice".parse().unwrap();
        fill(&mut c, &[], &env).unwrap();
        assert_eq!(c.get_user(), Some("alice"));
        assert_eq!(c.get_dbname(), Some("envdb"));
        assert_eq!(c.get_hosts().len(), 2);
        assert_eq!(c.get_ports(), &[6432, 6433]);
        assert_eq!(c.get_password(), Some(&b"envpw"[..]));
        assert_eq!(c.get_application_name(), Some("billing"));
    }

    #[test]
    fn a_service_comes_before_the_environment() {
        let text = "[other]\nhost=x\n[billing]\nhost=svc.example\nport=7000\ndbname=svcdb\n";
        let params = service_section(text, "billing", Path::new("f"))
            .unwrap()
            .unwrap();
        let env = |k: &str| (k == "PGDATABASE").then(|| "envdb".to_string());
        let mut c: Config = "user=u".parse().unwrap();
        fill(&mut c, &params, &env).unwrap();
        assert_eq!(c.get_dbname(), Some("svcdb"));
        assert_eq!(c.get_ports(), &[7000]);
        assert!(matches!(&c.get_hosts()[0], Host::Tcp(h) if h == "svc.example"));
        assert!(service_section(text, "missing", Path::new("f"))
            .unwrap()
            .is_none());
    }

    #[test]
    fn a_password_file_others_can_read_is_ignored() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pgpass");
        std::fs::write(&file, "*:*:*:*:pw\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut c: Config = "host=h user=u".parse().unwrap();
        password_file(&mut c, Some(file.display().to_string()), &|_| None);
        assert_eq!(c.get_password(), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        password_file(&mut c, Some(file.display().to_string()), &|_| None);
        assert_eq!(c.get_password(), Some(&b"pw"[..]));
    }
}
