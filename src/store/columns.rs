//! Column lists that more than one store module selects.

/// The key a message is sent to the provider with: its `delivery_key`, a UUID made
/// with the row, unique across databases and installs; but the id for a row whose
/// earlier attempts a replica of an earlier version made (it sent the id), and for rows
/// from before migration 0011, which have no key. A message is never re-sent under
/// another key than its earlier attempts used (docs/design.md, "Delivery keys").
macro_rules! delivery_key {
    () => {
        "CASE WHEN attempts > 0 AND delivery_key_sent IS NOT TRUE THEN id::text \
              ELSE coalesce(delivery_key::text, id::text) END AS delivery_key"
    };
    ($table:literal) => {
        concat!(
            "CASE WHEN ",
            $table,
            ".attempts > 0 AND ",
            $table,
            ".delivery_key_sent IS NOT TRUE THEN ",
            $table,
            ".id::text ELSE coalesce(",
            $table,
            ".delivery_key::text, ",
            $table,
            ".id::text) END AS delivery_key"
        )
    };
}
