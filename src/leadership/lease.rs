//! The Redis lease (docs/design.md#acquire, #keep, #release): `SET NX PX` with a fresh token, extended
//! and released only by compare-and-act Lua scripts, so a replica can never extend or
//! delete a lock that another replica holds.

use std::time::Duration;

use fred::prelude::*;

use crate::domain::LeaseToken;

/// Extend only if the key still holds our token.
const EXTEND: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                        return redis.call('pexpire', KEYS[1], ARGV[2]) \
                      else return 0 end";

/// Replace the key only if it still holds the dead term's token (ARGV[1]), or is gone
/// (it expired meanwhile): a compare-and-DEL of that term's key and our SET in one
/// step, so no other replica's newer key is ever touched, and no other acquisition
/// slips in between.
const TAKE_OVER: &str = "local holder = redis.call('get', KEYS[1]) \
                         if holder == ARGV[1] or not holder then \
                           redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) \
                           return 1 \
                         else return 0 end";

/// Delete only if the key still holds our token.
const RELEASE: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then \
                         return redis.call('del', KEYS[1]) \
                       else return 0 end";

#[derive(Clone)]
pub struct RedisLease {
    client: Client,
    key: String,
    ttl: Duration,
}

impl RedisLease {
    pub fn new(client: Client, key: impl Into<String>, ttl: Duration) -> Self {
        Self {
            client,
            key: key.into(),
            ttl,
        }
    }

    /// The pub/sub channel on which a leaving leader announces the free lock.
    pub fn release_channel(&self) -> String {
        format!("{}:released", self.key)
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// Tries to take the lock. `Ok(None)` means another replica holds it.
    pub async fn try_acquire(&self) -> Result<Option<LeaseToken>, Error> {
        let token = LeaseToken::generate();
        let reply: Option<String> = self
            .client
            .set(
                &self.key,
                token.as_str(),
                Some(Expiration::PX(self.ttl_ms())),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if reply.is_some() {
            return Ok(Some(token));
        }
        // A nil reply can be our own SET replayed after a reconnect: the first copy
        // took the key and the replay found it taken. The token is fresh, so if the
        // key holds it, the lock is ours.
        let holder: Option<String> = self.client.get(&self.key).await?;
        Ok((holder.as_deref() == Some(token.as_str())).then_some(token))
    }

    /// Sets the lock to `token` for a term taken over from a leader that is known to
    /// be gone: only if the key still holds `dead_token` or holds nothing. `Ok(false)`:
    /// another replica holds it.
    pub async fn take_over(&self, dead_token: &str, token: &LeaseToken) -> Result<bool, Error> {
        let replaced: i64 = self
            .client
            .eval(
                TAKE_OVER,
                vec![self.key.as_str()],
                vec![
                    dead_token.to_string(),
                    token.as_str().to_string(),
                    self.ttl_ms().to_string(),
                ],
            )
            .await?;
        Ok(replaced == 1)
    }

    /// Pushes the expiry to now + TTL. `Ok(false)`: the key is gone or not ours.
    pub async fn extend(&self, token: &LeaseToken) -> Result<bool, Error> {
        let extended: i64 = self
            .client
            .eval(
                EXTEND,
                vec![self.key.as_str()],
                vec![token.as_str().to_string(), self.ttl_ms().to_string()],
            )
            .await?;
        Ok(extended == 1)
    }

    /// Deletes the key if it is ours. `Ok(false)`: it was not ours any more.
    pub async fn release(&self, token: &LeaseToken) -> Result<bool, Error> {
        let deleted: i64 = self
            .client
            .eval(
                RELEASE,
                vec![self.key.as_str()],
                vec![token.as_str().to_string()],
            )
            .await?;
        Ok(deleted == 1)
    }

    /// Tells followers the lock is free so one takes it now rather than at its next
    /// retry.
    pub async fn announce_release(&self, replica_id: &str) -> Result<(), Error> {
        let _receivers: i64 = self
            .client
            .publish(self.release_channel(), replica_id)
            .await?;
        Ok(())
    }

    /// Who holds the lock right now (for tests and diagnostics).
    pub async fn holder_token(&self) -> Result<Option<String>, Error> {
        self.client.get(&self.key).await
    }

    /// The key of the leader's liveness beat: see [`RedisLease::beat`].
    fn alive_key(&self) -> String {
        format!("{}:alive", self.key)
    }

    /// The leader's liveness beat in Redis (docs/design.md#a-stalled-leader): a value
    /// that changes with every beat, `<token>:<seq>`, living a few beats. Followers
    /// take a leader for stalled only when its fence session in PostgreSQL and this
    /// beat have both stood still, so a blip on one path alone moves nothing.
    pub async fn beat(&self, token: &LeaseToken, seq: u64, lives: Duration) -> Result<(), Error> {
        let ms = i64::try_from(lives.as_millis()).unwrap_or(i64::MAX).max(1);
        self.client
            .set::<(), _, _>(
                self.alive_key(),
                format!("{}:{seq}", token.as_str()),
                Some(Expiration::PX(ms)),
                None,
                false,
            )
            .await
    }

    /// The leader's last beat, if it is still alive in Redis.
    pub async fn last_beat(&self) -> Result<Option<String>, Error> {
        self.client.get(self.alive_key()).await
    }
}
