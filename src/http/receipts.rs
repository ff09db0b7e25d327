//! `POST /api/delivery-receipts`: the provider reports what became of accepted
//! messages (see `store::receipts` for how early and repeated receipts are handled).
//!
//! Authentication: `DLR_TOKEN` as a Bearer token when it is set (so the provider's
//! callback never holds the operators' `API_TOKEN`), otherwise the `API_TOKEN` rule.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

use super::{ApiError, State, bearer_required, body, json, respond, with_state};
use crate::domain::DeliveryStatus;
use crate::store::receipts::{Receipt, ReceiptOutcome};

/// Most receipts one request may carry.
const MAX_RECEIPTS: usize = 1000;
/// Longest provider id or error code kept.
const MAX_TEXT: usize = 255;

pub fn routes(state: State) -> BoxedFilter<(Response,)> {
    warp::path!("delivery-receipts")
        .and(warp::post())
        .and(authorized(state.clone()))
        .and(with_state(state))
        .and(body::json_bytes())
        .then(|state: State, body: Bytes| async move { respond(receive(state, body)).await })
        .boxed()
}

/// `DLR_TOKEN` when set, else `API_TOKEN` when set, else open.
fn authorized(state: State) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone {
    bearer_required(state, |config| {
        config.dlr_token.as_ref().or(config.api_token.as_ref())
    })
}

#[derive(Serialize)]
struct Answer<'a> {
    message_id: &'a str,
    outcome: ReceiptOutcome,
}

/// Receipts in our own format, one object or an array; whether it was one object.
pub(super) fn parse(body: &[u8]) -> Result<(Vec<Receipt>, bool), ApiError> {
    let (items, single) = body::one_or_many::<ReceiptBody>(body, MAX_RECEIPTS, "receipt")?;
    let receipts = items
        .into_iter()
        .enumerate()
        .map(|(index, item)| {
            let receipt = item.validate();
            if single {
                receipt
            } else {
                receipt.map_err(|err| err.at_index(index))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((receipts, single))
}

async fn receive(state: State, body: Bytes) -> Result<Response, ApiError> {
    let (receipts, single) = parse(&body)?;
    let mut outcomes = Vec::with_capacity(receipts.len());
    for receipt in &receipts {
        let outcome = state.store.record_receipt(receipt, None).await?;
        state
            .metrics
            .delivery_receipts
            .with_label_values(&[receipt.status.as_str()])
            .inc();
        tracing::debug!(provider_message_id = %receipt.provider_message_id, status = receipt.status.as_str(), ?outcome, "delivery receipt");
        outcomes.push(outcome);
    }
    let answers: Vec<Answer> = receipts
        .iter()
        .zip(outcomes)
        .map(|(r, outcome)| Answer {
            message_id: &r.provider_message_id,
            outcome,
        })
        .collect();
    if single {
        Ok(json(StatusCode::OK, &answers[0]))
    } else {
        Ok(json(StatusCode::OK, &answers))
    }
}

/// One receipt as the provider sends it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptBody {
    message_id: String,
    status: String,
    #[serde(default)]
    error_code: Option<String>,
    #[serde(default)]
    delivered_at: Option<String>,
}

impl ReceiptBody {
    fn validate(self) -> Result<Receipt, ApiError> {
        let text = |name: &'static str, value: String| -> Result<String, ApiError> {
            if (1..=MAX_TEXT).contains(&value.len()) && !value.contains('\0') {
                Ok(value)
            } else {
                Err(ApiError::validation(
                    name,
                    format!("{name} must be a string of 1 to {MAX_TEXT} bytes"),
                ))
            }
        };
        let status = DeliveryStatus::parse(&self.status).ok_or_else(|| {
            ApiError::validation(
                "status",
                format!(
                    "status must be delivered, undelivered or failed (got {:?})",
                    self.status
                ),
            )
        })?;
        let delivered_at = self
            .delivered_at
            .map(|t| {
                crate::domain::parse_time("delivered_at", &t)
                    .map_err(|err| ApiError::validation(err.field, err.to_string()))
            })
            .transpose()?;
        Ok(Receipt {
            provider_message_id: text("message_id", self.message_id)?,
            status,
            error_code: self
                .error_code
                .map(|code| text("error_code", code))
                .transpose()?,
            delivered_at,
        })
    }
}
