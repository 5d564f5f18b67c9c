//! The ready `DATABASE_URL` that `forward` prints, pointed at the tunnel's local endpoint.
//!
//! Kept apart so it can be replaced by the library's URL builder in one place.

use sea_orm_tunnel::config::{Config, redact_url};
use sea_orm_tunnel::tunnel::LocalEndpoint;
use secrecy::ExposeSecret as _;

/// `DATABASE_URL` pointed at the local endpoint, password redacted.
pub(crate) fn local_database_url(config: &Config, endpoint: &LocalEndpoint) -> Option<String> {
    let original = config.database_url.expose_secret();
    let url = match endpoint {
        LocalEndpoint::Tcp(addr) => replace_authority(original, &addr.to_string())?,
        LocalEndpoint::Unix(_) => {
            let port = config.tunnel.as_ref()?.remote_port;
            let url = replace_authority(original, &format!("localhost:{port}"))?;
            let dir = endpoint.unix_dir()?.to_string_lossy().replace('%', "%25");
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}host={dir}")
        }
    };
    Some(redact_url(&url))
}

/// Replaces `host[:port]` of a `scheme://[userinfo@]host[:port]/...` URL.
fn replace_authority(url: &str, host_port: &str) -> Option<String> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let userinfo = authority.rfind('@').map_or("", |i| &authority[..=i]);
    Some(format!("{}{userinfo}{host_port}{}", &url[..start], &rest[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_url_keeps_user_db_and_query_and_hides_password() {
        assert_eq!(
            replace_authority(
                "postgres://app:pw@db.internal:5432/app?sslmode=disable",
                "127.0.0.1:4000"
            )
            .as_deref(),
            Some("postgres://app:pw@127.0.0.1:4000/app?sslmode=disable")
        );
        assert_eq!(
            replace_authority("postgres://db/app", "127.0.0.1:1").as_deref(),
            Some("postgres://127.0.0.1:1/app")
        );
        let config = Config::new("postgres://app:s3cret@db.internal:5432/app");
        let url = local_database_url(&config, &LocalEndpoint::Tcp(([127, 0, 0, 1], 4000).into())).unwrap();
        assert_eq!(url, "postgres://app:***@127.0.0.1:4000/app");
    }
}
