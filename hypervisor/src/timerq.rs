//! One-shot deadline timers over a monotonic nanosecond clock.
//!
//! [`TimerQueue`] is a fixed-capacity (no allocation) set of pending timers.
//! Operations are O(N) scans, which is fine for the small N a hypervisor
//! core needs. Timer ids carry a generation counter, so an id that has
//! been cancelled or has fired never matches a newer timer reusing the same
//! slot.

use core::fmt;

/// Identifies one inserted timer (slot index + generation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TimerId {
    slot: u32,
    generation: u32,
}

impl TimerId {
    /// Packs the id into a `u64` (e.g. to pass through an opaque token).
    #[must_use]
    pub const fn to_raw(self) -> u64 {
        ((self.generation as u64) << 32) | self.slot as u64
    }

    /// Reverses [`Self::to_raw`].
    #[must_use]
    pub const fn from_raw(raw: u64) -> Self {
        Self {
            slot: raw as u32,
            generation: (raw >> 32) as u32,
        }
    }
}

/// The queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Full;

impl fmt::Display for Full {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("timer queue full")
    }
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    deadline: u64,
    token: u64,
    /// Insertion sequence number, for FIFO order among equal deadlines.
    seq: u64,
    generation: u32,
    active: bool,
}

impl Slot {
    const EMPTY: Slot = Slot {
        deadline: 0,
        token: 0,
        seq: 0,
        generation: 0,
        active: false,
    };
}

/// Fixed-capacity one-shot timer queue; see the [module docs](self).
#[derive(Clone, Debug)]
pub struct TimerQueue<const N: usize> {
    slots: [Slot; N],
    len: usize,
    next_seq: u64,
}

impl<const N: usize> Default for TimerQueue<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> TimerQueue<N> {
    /// An empty queue (usable in a `static`).
    #[must_use]
    pub const fn new() -> Self {
        Self {
            slots: [Slot::EMPTY; N],
            len: 0,
            next_seq: 0,
        }
    }

    /// Adds a timer firing at `deadline_ns` carrying `token`.
    pub fn insert(&mut self, deadline_ns: u64, token: u64) -> Result<TimerId, Full> {
        let (idx, slot) = self
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| !s.active)
            .ok_or(Full)?;
        let slot_no = u32::try_from(idx).map_err(|_| Full)?;
        slot.deadline = deadline_ns;
        slot.token = token;
        slot.seq = self.next_seq;
        slot.active = true;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.len += 1;
        Ok(TimerId {
            slot: slot_no,
            generation: slot.generation,
        })
    }

    fn slot_of(&mut self, id: TimerId) -> Option<&mut Slot> {
        let s = self.slots.get_mut(usize::try_from(id.slot).ok()?)?;
        (s.active && s.generation == id.generation).then_some(s)
    }

    fn release(s: &mut Slot) {
        s.active = false;
        s.generation = s.generation.wrapping_add(1);
    }

    /// Cancels a pending timer; `false` if it already fired, was cancelled,
    /// or the id is stale / bogus.
    pub fn cancel(&mut self, id: TimerId) -> bool {
        match self.slot_of(id) {
            Some(s) => {
                Self::release(s);
                self.len -= 1;
                true
            }
            None => false,
        }
    }

    /// Whether `id` is still pending.
    #[must_use]
    pub fn is_pending(&self, id: TimerId) -> bool {
        usize::try_from(id.slot)
            .ok()
            .and_then(|i| self.slots.get(i))
            .is_some_and(|s| s.active && s.generation == id.generation)
    }

    fn earliest(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active)
            .min_by_key(|(_, s)| (s.deadline, s.seq))
            .map(|(i, _)| i)
    }

    /// The earliest pending deadline.
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        self.earliest()
            .and_then(|i| self.slots.get(i))
            .map(|s| s.deadline)
    }

    /// Removes and returns the earliest timer with `deadline <= now_ns`
    /// (ties in insertion order). Call repeatedly until `None`.
    pub fn pop_expired(&mut self, now_ns: u64) -> Option<(TimerId, u64)> {
        let i = self.earliest()?;
        let s = self.slots.get_mut(i)?;
        if s.deadline > now_ns {
            return None;
        }
        let id = TimerId {
            slot: u32::try_from(i).ok()?,
            generation: s.generation,
        };
        let token = s.token;
        Self::release(s);
        self.len -= 1;
        Some((id, token))
    }

    /// Number of pending timers.
    #[must_use]
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether no timer is pending.
    #[must_use]
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum number of pending timers.
    #[must_use]
    pub const fn capacity(&self) -> usize {
        N
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_and_ties() {
        let mut q = TimerQueue::<8>::new();
        assert_eq!(q.next_deadline(), None);
        assert_eq!(q.pop_expired(u64::MAX), None);
        q.insert(300, 3).unwrap();
        q.insert(100, 1).unwrap();
        q.insert(200, 20).unwrap();
        q.insert(200, 21).unwrap();
        q.insert(200, 22).unwrap();
        assert_eq!(q.len(), 5);
        assert_eq!(q.next_deadline(), Some(100));
        assert_eq!(q.pop_expired(99), None);
        assert_eq!(q.pop_expired(100).map(|t| t.1), Some(1));
        assert_eq!(q.pop_expired(100), None);
        assert_eq!(q.next_deadline(), Some(200));
        let fired: Vec<u64> = core::iter::from_fn(|| q.pop_expired(250))
            .map(|t| t.1)
            .collect();
        assert_eq!(fired, [20, 21, 22]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_expired(u64::MAX).map(|t| t.1), Some(3));
        assert!(q.is_empty());
    }

    #[test]
    fn ties_keep_insertion_order_across_slot_reuse() {
        let mut q = TimerQueue::<4>::new();
        let a = q.insert(10, 0).unwrap();
        q.insert(50, 1).unwrap();
        assert!(q.cancel(a));
        // Reuses slot 0 but was inserted after token 1.
        q.insert(50, 2).unwrap();
        assert_eq!(q.pop_expired(50).map(|t| t.1), Some(1));
        assert_eq!(q.pop_expired(50).map(|t| t.1), Some(2));
    }

    #[test]
    fn full_and_cancel() {
        let mut q = TimerQueue::<2>::new();
        let a = q.insert(5, 1).unwrap();
        let b = q.insert(6, 2).unwrap();
        assert_eq!(q.insert(7, 3), Err(Full));
        assert!(q.cancel(a));
        assert!(!q.cancel(a));
        assert_eq!(q.len(), 1);
        assert_eq!(q.next_deadline(), Some(6));
        let c = q.insert(1, 3).unwrap();
        assert_ne!(c, a);
        assert!(!q.cancel(a), "stale id cancelled newer timer");
        assert!(q.is_pending(c));
        assert!(q.is_pending(b));
        assert!(!q.is_pending(a));
        assert_eq!(q.pop_expired(10).map(|t| t.1), Some(3));
        assert!(!q.cancel(c), "fired timer cancelled");
        let d = q.insert(2, 4).unwrap();
        assert!(!q.cancel(c));
        assert!(q.cancel(d));
        // Bogus ids.
        assert!(!q.cancel(TimerId::from_raw(u64::MAX)));
        assert!(!q.cancel(TimerId::from_raw(99)));
        let mut z = TimerQueue::<0>::new();
        assert_eq!(z.insert(1, 1), Err(Full));
        assert_eq!(z.pop_expired(5), None);
    }

    #[test]
    fn fired_id_matches_inserted_and_raw_round_trip() {
        let mut q = TimerQueue::<4>::new();
        let a = q.insert(7, 70).unwrap();
        assert_eq!(TimerId::from_raw(a.to_raw()), a);
        assert_eq!(q.pop_expired(7), Some((a, 70)));
    }

    #[test]
    fn random_against_model() {
        let mut q = TimerQueue::<16>::new();
        let mut model: Vec<(u64, u64, TimerId)> = Vec::new(); // (deadline, seq, id)
        let mut seq = 0;
        let mut now = 0;
        let mut rng = crate::testutil::Rng(0x1357_9bdf);
        let mut next = || rng.next_u64();
        for _ in 0..20_000 {
            match next() % 4 {
                0 | 1 => {
                    let dl = now + next() % 100;
                    match q.insert(dl, seq) {
                        Ok(id) => model.push((dl, seq, id)),
                        Err(Full) => assert_eq!(model.len(), 16),
                    }
                    seq += 1;
                }
                2 if !model.is_empty() => {
                    let i = (next() as usize) % model.len();
                    let (_, _, id) = model.remove(i);
                    assert!(q.cancel(id));
                    assert!(!q.cancel(id));
                }
                _ => {
                    now += next() % 50;
                    model.sort_by_key(|m| (m.0, m.1));
                    while let Some(&(dl, tok, id)) = model.first().filter(|m| m.0 <= now) {
                        assert_eq!(q.pop_expired(now), Some((id, tok)));
                        let _ = dl;
                        model.remove(0);
                    }
                    assert_eq!(q.pop_expired(now), None);
                }
            }
            assert_eq!(q.len(), model.len());
            assert_eq!(q.next_deadline(), model.iter().map(|m| m.0).min());
        }
    }
}
