//! How consecutive batches of one leader hand over to each other: the shared send
//! slots, the signals between a batch and the next, and the start gate that counts a
//! batch's messages through (docs/design.md#overlap).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use tokio::sync::{Semaphore, oneshot};

/// How a batch overlaps its neighbours (docs/design.md#overlap). Run one after
/// another, a batch's claim and the statements after its last send (the last group of
/// results, the close) would leave the provider and this replica idle. So the leader
/// claims the next batch as soon as this one starts sending, and that batch starts
/// sending once every message of this one has passed its start gate, while this
/// one's last sends are answered and its results recorded. Claimed any later, the
/// next batch is often not ready when this one's sends end.
///
/// Every batch's sends share one set of `SEND_CONCURRENCY` slots, taken in the order
/// asked (the semaphore is fair), so the limit holds across the boundary, a slot freed
/// at the tail of a batch serves the next batch at once, and at `SEND_CONCURRENCY` 1
/// the next batch's first send still starts only after this one's last answer.
pub(super) struct Handoff {
    /// The send slots every batch of this leader shares.
    pub slots: Rc<Semaphore>,
    /// How the previous batch ended; see [`Signals`].
    pub previous: Previous,
    /// Fired when this batch starts sending: claim the next batch now. Never fired
    /// when the previous batch stopped sending.
    pub claim_next: oneshot::Sender<()>,
    /// This batch's side of the next batch's [`Previous`].
    pub signals: Signals,
}

/// What a batch tells the next one.
pub(super) struct Signals {
    /// Fired once every message has passed its start gate: `true` when every one
    /// started its send (or expired), `false` when the batch stopped sending
    /// (leadership lost, cluster stopped, shutdown). Dropped unfired when the batch
    /// was abandoned at shutdown. Short of `true`, the next batch sends nothing, so
    /// that this batch's unsent (older) rows are not overtaken: all go back to
    /// pending.
    pub(super) started: oneshot::Sender<bool>,
    /// Fired once every send of this batch and of the batches before it has its
    /// answer; dropped unfired when one of them was abandoned at shutdown with sends
    /// of unknown outcome on the wire. Until it fires, the next batch does not close:
    /// an abandoned batch stays open in the fence row, and a later close would close
    /// it. (A batch's sends may all be answered before an earlier batch's slow one.)
    pub(super) answered: oneshot::Sender<()>,
}

/// The receiving side of the previous batch's [`Signals`].
pub(super) struct Previous {
    pub(super) started: oneshot::Receiver<bool>,
    pub(super) answered: oneshot::Receiver<()>,
}

/// A new pair of signals between a batch and the next one.
pub(super) fn signals() -> (Signals, Previous) {
    let (started, on_started) = oneshot::channel();
    let (answered, on_answered) = oneshot::channel();
    (
        Signals { started, answered },
        Previous {
            started: on_started,
            answered: on_answered,
        },
    )
}

impl Previous {
    /// What the first batch of a term, or one claimed after the previous batch had
    /// ended, waits for: nothing. An ended batch has released its unsent rows, so
    /// the new one cannot overtake them, however its sends ended.
    pub(super) fn ended() -> Self {
        let (signals, previous) = signals();
        let _ = signals.started.send(true);
        let _ = signals.answered.send(());
        previous
    }
}

/// Counts a batch's messages through their start gate and fires
/// [`Signals::started`] when the last one is through.
pub(super) struct StartGate {
    remaining: Cell<usize>,
    all_started: Cell<bool>,
    signal: RefCell<Option<oneshot::Sender<bool>>>,
}

impl StartGate {
    pub(super) fn new(messages: usize, signal: oneshot::Sender<bool>) -> Self {
        let gate = Self {
            remaining: Cell::new(messages),
            all_started: Cell::new(true),
            signal: RefCell::new(Some(signal)),
        };
        gate.fire_when_through();
        gate
    }

    /// One message is through: its send starts now (`true`) or never (`false`).
    pub(super) fn passed(&self, started: bool) {
        self.all_started.set(self.all_started.get() && started);
        self.remaining.set(self.remaining.get().saturating_sub(1));
        self.fire_when_through();
    }

    fn fire_when_through(&self) {
        if self.remaining.get() == 0 {
            if let Some(signal) = self.signal.borrow_mut().take() {
                let _ = signal.send(self.all_started.get());
            }
        }
    }
}
