//! Bearer tokens: `API_TOKEN` for the API, `DLR_TOKEN` for delivery receipts,
//! compared in a time that tells nothing of the token.

use warp::Filter;

use super::{ApiError, State, with_state};

/// When `API_TOKEN` is set, requires `Authorization: Bearer <token>`.
pub(super) fn authorized(
    state: State,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    bearer_required(state, |config| config.api_token.as_ref())
}

/// Requires `Authorization: Bearer <token>` when `token` names one (open otherwise),
/// compared so that the time taken tells nothing of the token ([`tokens_match`]).
pub(super) fn bearer_required(
    state: State,
    token: fn(&crate::config::Config) -> Option<&crate::config::Secret>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("authorization")
        .and(with_state(state))
        .and_then(move |header: Option<String>, state: State| async move {
            let Some(token) = token(&state.config) else {
                return Ok(());
            };
            let presented = header.as_deref().and_then(bearer_token).unwrap_or("");
            if tokens_match(presented.as_bytes(), token.expose().as_bytes()) {
                Ok(())
            } else {
                Err(warp::reject::custom(ApiError::Unauthorized))
            }
        })
        .untuple_one()
}

/// The token of an `Authorization: Bearer <token>` header. The scheme name is
/// case-insensitive (RFC 7235); the token is taken as it is.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Whether a presented token is the expected one, in a time that depends on neither
/// token's content nor on the expected one's length: both are hashed (SHA-256) and
/// the fixed-size digests compared without an early exit. Comparing the tokens
/// themselves would return at once on a length mismatch, telling an attacker the
/// token's length.
pub(super) fn tokens_match(presented: &[u8], expected: &[u8]) -> bool {
    use aws_lc_rs::digest::{SHA256, digest};
    let (a, b) = (digest(&SHA256, presented), digest(&SHA256, expected));
    a.as_ref()
        .iter()
        .zip(b.as_ref())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, tokens_match};

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(tokens_match(b"secret", b"secret"));
        assert!(!tokens_match(b"secret", b"secreT"));
        assert!(!tokens_match(b"secret", b"secret!"));
        assert!(!tokens_match(b"secre", b"secret"));
        assert!(!tokens_match(b"", b"secret"));
        assert!(tokens_match(b"", b""));
    }
}
