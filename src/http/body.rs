//! Request bodies: at most 1 MiB (with or without Content-Length), parsed as JSON
//! with a 400 for anything that is not.

use bytes::Buf;
use futures::StreamExt;
use serde_json::Value;
use warp::Filter;

use super::ApiError;

pub const MAX_BODY: usize = 1 << 20;

/// The body as JSON. Rejects with 413 over the limit and 400 when it is not JSON.
pub fn json_value() -> impl Filter<Extract = (Value,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and_then(|length: Option<u64>| async move {
            match length {
                Some(n) if n > MAX_BODY as u64 => {
                    Err(warp::reject::custom(ApiError::PayloadTooLarge))
                }
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(warp::body::stream())
        .and_then(|stream| async move {
            let bytes = read_limited(stream).await.map_err(warp::reject::custom)?;
            parse(&bytes).map_err(warp::reject::custom)
        })
}

async fn read_limited<S, B>(stream: S) -> Result<Vec<u8>, ApiError>
where
    S: futures::Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut stream = std::pin::pin!(stream);
    let mut body = Vec::new();
    while let Some(chunk) = stream.next().await {
        let mut chunk = chunk
            .map_err(|err| ApiError::bad_request(format!("could not read the body: {err}")))?;
        if body.len() + chunk.remaining() > MAX_BODY {
            return Err(ApiError::PayloadTooLarge);
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            body.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(body)
}

/// A body that is one object or an array of 1 to `max` objects, each parsed by
/// `parse`. Returns the items and whether it was a single object (the answer mirrors
/// the input); an item's error names its index in an array.
pub fn one_or_many<T>(
    body: Value,
    max: usize,
    noun: &str,
    parse: impl Fn(&Value) -> Result<T, ApiError>,
) -> Result<(Vec<T>, bool), ApiError> {
    let (items, single) = match body {
        Value::Array(items) => (items, false),
        object @ Value::Object(_) => (vec![object], true),
        _ => {
            return Err(ApiError::validation(
                "body",
                format!("expected a {noun} object or an array of {noun} objects"),
            ));
        }
    };
    if items.is_empty() || items.len() > max {
        return Err(ApiError::validation(
            "body",
            format!("{} {noun}s in one request; send 1 to {max}", items.len()),
        ));
    }
    let parsed = items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            let parsed = parse(item);
            if single {
                parsed
            } else {
                parsed.map_err(|err| err.at_index(index))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((parsed, single))
}

fn parse(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest {
            code: "invalid_json",
            message: "the request body is empty; expected JSON".into(),
        });
    }
    serde_json::from_slice(bytes).map_err(|err| ApiError::BadRequest {
        code: "invalid_json",
        message: format!("the request body is not valid JSON: {err}"),
    })
}
