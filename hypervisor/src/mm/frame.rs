//! Bitmap physical frame allocator.
//!
//! One bit per 4 KiB frame over `[0, total_frames)`, stored in a
//! caller-provided `&mut [u64]` (the kernel places it in RAM found with
//! [`find_free_run`](super::region::find_free_run)). The storage holds two
//! bitmaps of [`FrameAllocator::bitmap_words`]` / 2` words each:
//!
//! * the *used* bitmap (1 = used / not available), and
//! * the *managed* bitmap (1 = the frame was ever handed to
//!   [`FrameAllocator::add_free_range`], i.e. it is real usable RAM).
//!
//! The managed bitmap lets [`FrameAllocator::free`] reject frames that were
//! never usable RAM (firmware areas, MMIO, garbage pointers) instead of
//! silently corrupting the allocator.
//!
//! # Allocation policy
//!
//! [`FrameAllocator::alloc`] hands out the **highest** free frame first, so
//! memory below 4 GiB (and the ISA/low-1 MiB area) stays available for the
//! things that need it: early page tables (only 0..4 GiB is mapped during
//! boot), 32-bit guests, DMA. [`FrameAllocator::alloc_below`] serves those.
//! Both searches keep a hint ("no free frame above word *w*") so repeated
//! allocation is amortised O(1); the scan skips full words.
//!
//! Never allocates.

use core::fmt;

use super::PAGE_SIZE;
use super::region::PhysRange;

/// A 4 KiB physical frame, identified by its frame number
/// (`address / 4096`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PhysFrame(u64);

impl PhysFrame {
    /// The frame with number `n`.
    #[must_use]
    pub const fn from_number(n: u64) -> Self {
        Self(n)
    }

    /// The frame starting at `addr`, or `None` if `addr` isn't 4 KiB
    /// aligned.
    #[must_use]
    pub const fn from_address(addr: u64) -> Option<Self> {
        if addr.is_multiple_of(PAGE_SIZE) {
            Some(Self(addr / PAGE_SIZE))
        } else {
            None
        }
    }

    /// The frame containing `addr`.
    #[must_use]
    pub const fn containing_address(addr: u64) -> Self {
        Self(addr / PAGE_SIZE)
    }

    /// Frame number.
    #[must_use]
    pub const fn number(self) -> u64 {
        self.0
    }

    /// Physical address of the first byte (saturating for absurd numbers).
    #[must_use]
    pub const fn start_address(self) -> u64 {
        self.0.saturating_mul(PAGE_SIZE)
    }

    /// The frame's address range.
    #[must_use]
    pub const fn range(self) -> PhysRange {
        let start = self.start_address();
        PhysRange::new(start, start.saturating_add(PAGE_SIZE))
    }
}

impl fmt::Display for PhysFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "frame {:#x}", self.start_address())
    }
}

/// Frame allocator errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The provided storage is smaller than [`FrameAllocator::bitmap_words`].
    StorageTooSmall {
        /// Words needed.
        needed: usize,
        /// Words provided.
        got: usize,
    },
    /// The frame lies beyond `total_frames`.
    OutOfRange(PhysFrame),
    /// The frame was never added as usable RAM.
    NotManaged(PhysFrame),
    /// The frame is already free.
    DoubleFree(PhysFrame),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::StorageTooSmall { needed, got } => {
                write!(
                    f,
                    "frame bitmap storage too small ({got} of {needed} words)"
                )
            }
            FrameError::OutOfRange(fr) => write!(f, "{fr} is beyond the managed range"),
            FrameError::NotManaged(fr) => write!(f, "{fr} is not usable RAM"),
            FrameError::DoubleFree(fr) => write!(f, "double free of {fr}"),
        }
    }
}

/// Iterates `(word index, mask)` pairs covering frame numbers `[a, b)`.
fn word_masks(a: u64, b: u64) -> impl DoubleEndedIterator<Item = (usize, u64)> {
    let first = a / 64;
    let last = if b == 0 { 0 } else { (b - 1) / 64 };
    let end = if a < b { last + 1 } else { first };
    (first..end).map(move |w| {
        let lo = if w == first { a % 64 } else { 0 };
        let hi = if w == last { (b - 1) % 64 } else { 63 };
        // Bits lo..=hi set.
        let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        (w as usize, mask)
    })
}

/// Bitmap frame allocator; see the [module docs](self).
pub struct FrameAllocator<'a> {
    /// Used bitmap (1 = used).
    used: &'a mut [u64],
    /// Managed bitmap (1 = usable RAM).
    managed: &'a mut [u64],
    total_frames: u64,
    free: u64,
    managed_frames: u64,
    /// No free frame lives in a word above this index.
    top_hint: usize,
    /// `(limit_frame, word)`: no free frame below `limit_frame` lives in a
    /// word above `word`. `limit_frame == 0` means "no hint".
    below_hint: (u64, usize),
}

impl fmt::Debug for FrameAllocator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameAllocator")
            .field("total_frames", &self.total_frames)
            .field("managed", &self.managed_frames)
            .field("free", &self.free)
            .finish_non_exhaustive()
    }
}

impl<'a> FrameAllocator<'a> {
    /// Number of `u64` words of storage needed for `total_frames` frames
    /// (both bitmaps). Saturates at `usize::MAX` for absurd sizes.
    #[must_use]
    pub fn bitmap_words(total_frames: u64) -> usize {
        usize::try_from(total_frames.div_ceil(64))
            .ok()
            .and_then(|w| w.checked_mul(2))
            .unwrap_or(usize::MAX)
    }

    /// Bytes of storage needed for `total_frames` frames.
    #[must_use]
    pub fn bitmap_bytes(total_frames: u64) -> u64 {
        (Self::bitmap_words(total_frames) as u64).saturating_mul(8)
    }

    /// Number of frames needed to cover physical addresses `[0, end)`.
    #[must_use]
    pub const fn frames_for(end: u64) -> u64 {
        end.div_ceil(PAGE_SIZE)
    }

    /// Creates an allocator over frames `[0, total_frames)`, all used and
    /// unmanaged. Only the first [`Self::bitmap_words`] words of `storage`
    /// are used.
    pub fn new(storage: &'a mut [u64], total_frames: u64) -> Result<Self, FrameError> {
        let needed = Self::bitmap_words(total_frames);
        let got = storage.len();
        let Some(storage) = storage.get_mut(..needed) else {
            return Err(FrameError::StorageTooSmall { needed, got });
        };
        let (used, managed) = storage.split_at_mut(needed / 2);
        used.fill(u64::MAX);
        managed.fill(0);
        Ok(Self {
            used,
            managed,
            total_frames,
            free: 0,
            managed_frames: 0,
            top_hint: 0,
            below_hint: (0, 0),
        })
    }

    /// Number of frames covered by the bitmap.
    #[must_use]
    pub fn total_frames(&self) -> u64 {
        self.total_frames
    }

    /// Frame-number interval of `r` rounded *inward* to whole frames and
    /// clipped to `[0, total_frames)`.
    fn inward_frames(&self, r: PhysRange) -> (u64, u64) {
        let a = r.start.div_ceil(PAGE_SIZE);
        let b = (r.end / PAGE_SIZE).min(self.total_frames);
        (a, b)
    }

    /// Frame-number interval of `r` rounded *outward* and clipped.
    fn outward_frames(&self, r: PhysRange) -> (u64, u64) {
        if r.is_empty() {
            return (0, 0);
        }
        let a = r.start / PAGE_SIZE;
        let b = r.end.div_ceil(PAGE_SIZE).min(self.total_frames);
        (a, b)
    }

    /// Marks every whole frame inside `r` as usable RAM and free. Parts
    /// outside `[0, total_frames)` and partial frames are ignored.
    ///
    /// Meant for initialisation: adding a range that contains allocated
    /// frames frees them.
    pub fn add_free_range(&mut self, r: PhysRange) {
        let (a, b) = self.inward_frames(r);
        if a >= b {
            return;
        }
        for (w, mask) in word_masks(a, b) {
            let (Some(u), Some(m)) = (self.used.get_mut(w), self.managed.get_mut(w)) else {
                continue;
            };
            let newly_managed = mask & !*m;
            let newly_free = mask & *u;
            *m |= mask;
            *u &= !mask;
            self.managed_frames += u64::from(newly_managed.count_ones());
            self.free += u64::from(newly_free.count_ones());
        }
        self.note_freed(a, b);
    }

    /// Marks every frame touching `r` as used (e.g. the bitmap itself, a
    /// module). Frames that are already used are left alone.
    pub fn mark_used(&mut self, r: PhysRange) {
        let (a, b) = self.outward_frames(r);
        for (w, mask) in word_masks(a, b) {
            let (Some(u), Some(m)) = (self.used.get_mut(w), self.managed.get(w)) else {
                continue;
            };
            let newly_used = mask & !*u & *m;
            *u |= mask;
            self.free -= u64::from(newly_used.count_ones());
        }
    }

    /// Updates the search hints after frames `[a, b)` (non-empty) became
    /// free.
    fn note_freed(&mut self, a: u64, b: u64) {
        self.top_hint = self.top_hint.max(((b - 1) / 64) as usize);
        let (limit, hint) = self.below_hint;
        if a < limit {
            let highest = b.min(limit) - 1;
            self.below_hint.1 = hint.max((highest / 64) as usize);
        }
    }

    /// Highest free frame with number `< limit`, scanning down from word
    /// `start_word`.
    fn find_free_below(&self, limit: u64, start_word: usize) -> Option<(u64, usize)> {
        let limit = limit.min(self.total_frames);
        if limit == 0 {
            return None;
        }
        let limit_word = ((limit - 1) / 64) as usize;
        let mut w = start_word.min(limit_word);
        loop {
            let mut free_bits = !self.used.get(w).copied().unwrap_or(u64::MAX);
            if w == limit_word {
                let top_bit = (limit - 1) % 64;
                free_bits &= u64::MAX >> (63 - top_bit);
            }
            if free_bits != 0 {
                let bit = 63 - u64::from(free_bits.leading_zeros());
                return Some((w as u64 * 64 + bit, w));
            }
            if w == 0 {
                return None;
            }
            w -= 1;
        }
    }

    fn take(&mut self, n: u64) -> PhysFrame {
        let w = (n / 64) as usize;
        if let Some(u) = self.used.get_mut(w) {
            *u |= 1 << (n % 64);
        }
        self.free -= 1;
        PhysFrame(n)
    }

    /// Allocates the highest free frame.
    pub fn alloc(&mut self) -> Option<PhysFrame> {
        if self.free == 0 {
            return None;
        }
        match self.find_free_below(self.total_frames, self.top_hint) {
            Some((n, w)) => {
                self.top_hint = w;
                Some(self.take(n))
            }
            None => {
                self.top_hint = 0;
                None
            }
        }
    }

    /// Allocates the highest free frame that ends at or below physical
    /// address `limit` (e.g. `4 << 30` for early page tables).
    pub fn alloc_below(&mut self, limit: u64) -> Option<PhysFrame> {
        let limit_frame = (limit / PAGE_SIZE).min(self.total_frames);
        if self.free == 0 || limit_frame == 0 {
            return None;
        }
        let (hint_limit, hint_word) = self.below_hint;
        let mut start = ((limit_frame - 1) / 64) as usize;
        if hint_limit != 0 && limit_frame <= hint_limit {
            start = start.min(hint_word);
        }
        start = start.min(self.top_hint);
        let found = self.find_free_below(limit_frame, start);
        match found {
            Some((n, w)) => {
                self.below_hint = (limit_frame, w);
                Some(self.take(n))
            }
            None => {
                self.below_hint = (limit_frame, 0);
                None
            }
        }
    }

    /// Highest used frame in `[a, b)`, if any.
    fn highest_used_in(&self, a: u64, b: u64) -> Option<u64> {
        word_masks(a, b).rev().find_map(|(w, mask)| {
            let used = self.used.get(w).copied().unwrap_or(u64::MAX) & mask;
            (used != 0).then(|| w as u64 * 64 + 63 - u64::from(used.leading_zeros()))
        })
    }

    /// Allocates `count` physically contiguous frames whose first frame
    /// number is a multiple of `align_frames` (0 is treated as 1), taking the
    /// highest such run. Returns the first frame.
    pub fn alloc_contiguous(&mut self, count: u64, align_frames: u64) -> Option<PhysFrame> {
        let align = align_frames.max(1);
        if count == 0 || count > self.free || count > self.total_frames {
            return None;
        }
        let mut start = super::align_down(self.total_frames - count, align);
        loop {
            match self.highest_used_in(start, start + count) {
                None => break,
                Some(u) => {
                    if u < count {
                        return None;
                    }
                    // The run must end at or below `u`: start <= u - count.
                    start = super::align_down(u - count, align);
                }
            }
        }
        for (w, mask) in word_masks(start, start + count) {
            if let Some(u) = self.used.get_mut(w) {
                *u |= mask;
            }
        }
        self.free -= count;
        Some(PhysFrame(start))
    }

    fn check_freeable(&self, f: PhysFrame, count: u64) -> Result<(), FrameError> {
        let a = f.0;
        let b = match a.checked_add(count) {
            Some(b) if b <= self.total_frames => b,
            _ => return Err(FrameError::OutOfRange(f)),
        };
        for (w, mask) in word_masks(a, b) {
            let m = self.managed.get(w).copied().unwrap_or(0);
            let u = self.used.get(w).copied().unwrap_or(u64::MAX);
            let unmanaged = mask & !m;
            if unmanaged != 0 {
                let bit = u64::from(unmanaged.trailing_zeros());
                return Err(FrameError::NotManaged(PhysFrame(w as u64 * 64 + bit)));
            }
            let already_free = mask & !u;
            if already_free != 0 {
                let bit = u64::from(already_free.trailing_zeros());
                return Err(FrameError::DoubleFree(PhysFrame(w as u64 * 64 + bit)));
            }
        }
        Ok(())
    }

    /// Frees one frame. Frames beyond the bitmap, never-usable frames and
    /// already-free frames are rejected without changing anything.
    pub fn free(&mut self, f: PhysFrame) -> Result<(), FrameError> {
        self.free_contiguous(f, 1)
    }

    /// Frees `count` frames starting at `f`. All frames are validated first;
    /// on error nothing is freed.
    pub fn free_contiguous(&mut self, f: PhysFrame, count: u64) -> Result<(), FrameError> {
        if count == 0 {
            return Ok(());
        }
        self.check_freeable(f, count)?;
        let end = f.0 + count;
        for (w, mask) in word_masks(f.0, end) {
            if let Some(u) = self.used.get_mut(w) {
                *u &= !mask;
            }
        }
        self.free += count;
        self.note_freed(f.0, end);
        Ok(())
    }

    /// Number of free frames (exact).
    #[must_use]
    pub fn free_count(&self) -> u64 {
        self.free
    }

    /// Number of usable frames currently in use.
    #[must_use]
    pub fn used_count(&self) -> u64 {
        self.managed_frames - self.free
    }

    /// Number of usable frames (ever added with `add_free_range`).
    #[must_use]
    pub fn managed_count(&self) -> u64 {
        self.managed_frames
    }

    /// Whether `f` is free (false for unmanaged or out-of-range frames).
    #[must_use]
    pub fn is_free(&self, f: PhysFrame) -> bool {
        if f.0 >= self.total_frames {
            return false;
        }
        let w = (f.0 / 64) as usize;
        self.used.get(w).is_some_and(|u| u & (1 << (f.0 % 64)) == 0)
    }

    /// Whether `f` is usable RAM managed by this allocator.
    #[must_use]
    pub fn is_managed(&self, f: PhysFrame) -> bool {
        if f.0 >= self.total_frames {
            return false;
        }
        let w = (f.0 / 64) as usize;
        self.managed
            .get(w)
            .is_some_and(|m| m & (1 << (f.0 % 64)) != 0)
    }
}

impl super::paging::FrameSource for FrameAllocator<'_> {
    /// Takes the highest free frame (see [`FrameAllocator::alloc`]).
    fn alloc_table_frame(&mut self) -> Option<u64> {
        self.alloc().map(PhysFrame::start_address)
    }
}

/// A [`FrameSource`](super::paging::FrameSource) handing out frames that
/// end at or below `limit` (e.g. page tables during early boot, when only
/// the low 4 GiB are mapped).
#[derive(Debug)]
pub struct FramesBelow<'x, 'a> {
    /// The allocator to take frames from.
    pub allocator: &'x mut FrameAllocator<'a>,
    /// Exclusive upper bound for the frame's end address.
    pub limit: u64,
}

impl super::paging::FrameSource for FramesBelow<'_, '_> {
    fn alloc_table_frame(&mut self) -> Option<u64> {
        self.allocator
            .alloc_below(self.limit)
            .map(PhysFrame::start_address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn r(start: u64, end: u64) -> PhysRange {
        PhysRange::new(start, end)
    }

    fn storage(total: u64) -> Vec<u64> {
        vec![0xdead_beef; FrameAllocator::bitmap_words(total)]
    }

    fn check(fa: &FrameAllocator<'_>) {
        let mut free = 0;
        let mut managed = 0;
        for n in 0..fa.total_frames() {
            let f = PhysFrame::from_number(n);
            if fa.is_managed(f) {
                managed += 1;
                if fa.is_free(f) {
                    free += 1;
                }
            } else {
                assert!(!fa.is_free(f), "unmanaged frame {n} free");
            }
        }
        assert_eq!(free, fa.free_count());
        assert_eq!(managed, fa.managed_count());
        assert_eq!(fa.free_count() + fa.used_count(), fa.managed_count());
    }

    #[test]
    fn phys_frame() {
        assert_eq!(
            PhysFrame::from_address(0x3000),
            Some(PhysFrame::from_number(3))
        );
        assert_eq!(PhysFrame::from_address(0x3001), None);
        assert_eq!(PhysFrame::from_number(3).start_address(), 0x3000);
        assert_eq!(PhysFrame::containing_address(0x3fff).number(), 3);
        assert_eq!(PhysFrame::from_number(3).range(), r(0x3000, 0x4000));
    }

    #[test]
    fn sizing_and_storage_errors() {
        assert_eq!(FrameAllocator::bitmap_words(0), 0);
        assert_eq!(FrameAllocator::bitmap_words(1), 2);
        assert_eq!(FrameAllocator::bitmap_words(64), 2);
        assert_eq!(FrameAllocator::bitmap_words(65), 4);
        assert_eq!(FrameAllocator::bitmap_bytes(64 * 1024), 2 * 1024 * 8);
        assert_eq!(FrameAllocator::frames_for(4 * GIB + 1), 1024 * 1024 + 1);
        assert_eq!(FrameAllocator::bitmap_words(u64::MAX), 1 << 59);
        let mut s = vec![0; 3];
        assert_eq!(
            FrameAllocator::new(&mut s, 129).map(|_| ()),
            Err(FrameError::StorageTooSmall { needed: 6, got: 3 })
        );
        let mut big = vec![0; 100];
        let fa = FrameAllocator::new(&mut big, 129).unwrap();
        assert_eq!(fa.free_count(), 0);
        let mut empty: Vec<u64> = vec![];
        let mut fa = FrameAllocator::new(&mut empty, 0).unwrap();
        fa.add_free_range(r(0, GIB));
        assert_eq!(fa.alloc(), None);
        assert_eq!(fa.alloc_below(GIB), None);
        assert_eq!(fa.alloc_contiguous(1, 1), None);
        assert_eq!(
            fa.free(PhysFrame::from_number(0)),
            Err(FrameError::OutOfRange(PhysFrame::from_number(0)))
        );
    }

    #[test]
    fn add_and_mark() {
        let total = 1000;
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        assert_eq!(fa.managed_count(), 0);
        // Partial pages are ignored (rounded inward), out of range clipped.
        fa.add_free_range(r(0x1800, 0x5800));
        assert_eq!(fa.free_count(), 3); // frames 2,3,4
        assert!(!fa.is_free(PhysFrame::from_number(1)));
        assert!(fa.is_free(PhysFrame::from_number(2)));
        assert!(!fa.is_free(PhysFrame::from_number(5)));
        fa.add_free_range(r(990 * PAGE_SIZE, u64::MAX));
        assert_eq!(fa.free_count(), 13);
        // Overlapping add doesn't double count.
        fa.add_free_range(r(0x2000, 0x4000));
        assert_eq!(fa.free_count(), 13);
        assert_eq!(fa.managed_count(), 13);
        // mark_used rounds outward.
        fa.mark_used(r(0x2fff, 0x3001));
        assert_eq!(fa.free_count(), 11);
        assert_eq!(fa.used_count(), 2);
        fa.mark_used(r(0x2000, 0x3000));
        assert_eq!(fa.free_count(), 11);
        // mark_used of unmanaged memory changes nothing.
        fa.mark_used(r(100 * PAGE_SIZE, 200 * PAGE_SIZE));
        fa.mark_used(r(u64::MAX - 5, u64::MAX));
        assert_eq!(fa.free_count(), 11);
        check(&fa);
        // Marked frames are freeable (they are usable RAM).
        fa.free(PhysFrame::from_number(3)).unwrap();
        assert_eq!(fa.free_count(), 12);
        check(&fa);
    }

    #[test]
    fn alloc_prefers_high_and_below_respects_limit() {
        // 6 GiB of frames: usable 1M..3G and 4G..6G.
        let total = FrameAllocator::frames_for(6 * GIB);
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        fa.add_free_range(r(MIB, 3 * GIB));
        fa.add_free_range(r(4 * GIB, 6 * GIB));
        let f = fa.alloc().unwrap();
        assert_eq!(f.start_address(), 6 * GIB - PAGE_SIZE);
        let g = fa.alloc().unwrap();
        assert_eq!(g.start_address(), 6 * GIB - 2 * PAGE_SIZE);
        let l = fa.alloc_below(4 * GIB).unwrap();
        assert_eq!(l.start_address(), 3 * GIB - PAGE_SIZE);
        let l2 = fa.alloc_below(4 * GIB).unwrap();
        assert_eq!(l2.start_address(), 3 * GIB - 2 * PAGE_SIZE);
        // A smaller limit works and a limit mid-frame rounds down.
        let l3 = fa.alloc_below(2 * MIB + 100).unwrap();
        assert_eq!(l3.start_address(), 2 * MIB - PAGE_SIZE);
        assert!(l3.start_address() + PAGE_SIZE <= 2 * MIB + 100);
        assert_eq!(fa.alloc_below(MIB), None);
        assert_eq!(fa.alloc_below(0), None);
        // Freeing makes the hinted searches find it again.
        fa.free(l).unwrap();
        assert_eq!(fa.alloc_below(4 * GIB), Some(l));
        fa.free(f).unwrap();
        assert_eq!(fa.alloc(), Some(f));
        fa.free(l3).unwrap();
        assert_eq!(fa.alloc_below(2 * MIB), Some(l3));
        check_counts_only(&fa);
    }

    fn check_counts_only(fa: &FrameAllocator<'_>) {
        assert_eq!(fa.free_count() + fa.used_count(), fa.managed_count());
    }

    #[test]
    fn exhaust_and_refill() {
        let total = 300;
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        fa.add_free_range(r(10 * PAGE_SIZE, 250 * PAGE_SIZE));
        let base = fa.free_count();
        let mut seen = HashSet::new();
        while let Some(f) = fa.alloc() {
            assert!(seen.insert(f), "{f} handed out twice");
            assert!((10..250).contains(&f.number()));
            assert!(!fa.is_free(f));
        }
        assert_eq!(seen.len() as u64, base);
        assert_eq!(fa.free_count(), 0);
        assert_eq!(fa.alloc_below(u64::MAX), None);
        for f in &seen {
            fa.free(*f).unwrap();
        }
        assert_eq!(fa.free_count(), base);
        check(&fa);
    }

    #[test]
    fn free_errors_do_not_corrupt() {
        let total = 200;
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        fa.add_free_range(r(64 * PAGE_SIZE, 128 * PAGE_SIZE));
        let f = fa.alloc().unwrap();
        fa.free(f).unwrap();
        assert_eq!(fa.free(f), Err(FrameError::DoubleFree(f)));
        let unmanaged = PhysFrame::from_number(5);
        assert_eq!(fa.free(unmanaged), Err(FrameError::NotManaged(unmanaged)));
        let far = PhysFrame::from_number(200);
        assert_eq!(fa.free(far), Err(FrameError::OutOfRange(far)));
        let huge = PhysFrame::from_number(u64::MAX);
        assert_eq!(
            fa.free_contiguous(huge, 2),
            Err(FrameError::OutOfRange(huge))
        );
        // Contiguous free with one bad frame frees nothing.
        let run = fa.alloc_contiguous(4, 1).unwrap();
        let before = fa.free_count();
        fa.free(PhysFrame::from_number(run.number() + 2)).unwrap();
        assert_eq!(
            fa.free_contiguous(run, 4),
            Err(FrameError::DoubleFree(PhysFrame::from_number(
                run.number() + 2
            )))
        );
        assert_eq!(fa.free_count(), before + 1);
        assert!(!fa.is_free(run));
        // Straddling the managed boundary.
        let edge = PhysFrame::from_number(62);
        assert_eq!(
            fa.free_contiguous(edge, 4),
            Err(FrameError::NotManaged(edge))
        );
        assert_eq!(fa.free_contiguous(run, 0), Ok(()));
        check(&fa);
    }

    #[test]
    fn contiguous_runs() {
        let total = 4096;
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        fa.add_free_range(r(PAGE_SIZE, 4000 * PAGE_SIZE));
        // Fragment: use every 7th frame.
        for n in (1..4000).step_by(7) {
            fa.mark_used(PhysFrame::from_number(n).range());
        }
        let mut got = Vec::new();
        for _ in 0..20 {
            let Some(f) = fa.alloc_contiguous(6, 1) else {
                break;
            };
            got.push(f);
        }
        assert_eq!(got.len(), 20);
        assert!(fa.alloc_contiguous(7, 1).is_none());
        for f in &got {
            for i in 0..6 {
                assert!(!fa.is_free(PhysFrame::from_number(f.number() + i)));
            }
        }
        let set: HashSet<_> = got.iter().map(|f| f.number() / 7).collect();
        assert_eq!(set.len(), 20);
        for f in got {
            fa.free_contiguous(f, 6).unwrap();
        }
        check(&fa);

        // Aligned runs on an unfragmented allocator.
        let mut s2 = storage(total);
        let mut fb = FrameAllocator::new(&mut s2, total).unwrap();
        fb.add_free_range(r(3 * PAGE_SIZE, 3000 * PAGE_SIZE));
        let base = fb.free_count();
        let a = fb.alloc_contiguous(512, 512).unwrap();
        assert_eq!(a.number() % 512, 0);
        assert_eq!(a.number(), 2048);
        let b = fb.alloc_contiguous(512, 512).unwrap();
        assert_eq!(b.number(), 1536);
        let c = fb.alloc_contiguous(100, 64).unwrap();
        assert_eq!(c.number() % 64, 0);
        assert!(c.number() >= 2560 && c.number() + 100 <= 3000);
        assert_eq!(fb.free_count(), base - 1124);
        // A run that doesn't fit.
        assert!(fb.alloc_contiguous(2000, 1).is_none());
        assert!(fb.alloc_contiguous(0, 1).is_none());
        fb.free_contiguous(a, 512).unwrap();
        fb.free_contiguous(b, 512).unwrap();
        fb.free_contiguous(c, 100).unwrap();
        assert_eq!(fb.free_count(), base);
        // Whole managed area in one run, align 0 treated as 1.
        let all = fb.alloc_contiguous(base, 0).unwrap();
        assert_eq!(all.number(), 3);
        assert_eq!(fb.free_count(), 0);
        check(&fb);
    }

    #[test]
    fn frame_sources() {
        use crate::mm::paging::FrameSource;
        let total = FrameAllocator::frames_for(8 * GIB);
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        fa.add_free_range(r(MIB, 2 * MIB));
        fa.add_free_range(r(6 * GIB, 7 * GIB));
        assert_eq!(fa.alloc_table_frame(), Some(7 * GIB - PAGE_SIZE));
        let mut low = FramesBelow {
            allocator: &mut fa,
            limit: 4 * GIB,
        };
        assert_eq!(low.alloc_table_frame(), Some(2 * MIB - PAGE_SIZE));
        assert_eq!(fa.used_count(), 2);
    }

    #[test]
    fn above_4g_frames_handed_out() {
        let total = FrameAllocator::frames_for(4 * GIB + 64 * PAGE_SIZE);
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        fa.add_free_range(r(4 * GIB, 4 * GIB + 64 * PAGE_SIZE));
        fa.add_free_range(r(MIB, MIB + 8 * PAGE_SIZE));
        let mut high = 0;
        while let Some(f) = fa.alloc() {
            if f.start_address() >= 4 * GIB {
                high += 1;
            }
        }
        assert_eq!(high, 64);
        assert_eq!(fa.used_count(), 72);
    }

    #[test]
    fn random_stress_against_model() {
        let total = 5000;
        let mut s = storage(total);
        let mut fa = FrameAllocator::new(&mut s, total).unwrap();
        let mut rng = crate::testutil::Rng(0x9e37_79b9_7f4a_7c15);
        // A few random usable ranges.
        for _ in 0..12 {
            let a = rng.next_u64() % total;
            let len = rng.next_u64() % 600;
            fa.add_free_range(r(a * PAGE_SIZE, (a + len) * PAGE_SIZE));
        }
        check(&fa);
        let baseline = fa.free_count();
        let mut model: HashSet<u64> = HashSet::new(); // allocated frames
        let mut runs: Vec<(PhysFrame, u64)> = Vec::new();
        for step in 0..20_000 {
            match rng.next_u64() % 10 {
                0..=3 => {
                    if let Some(f) = fa.alloc() {
                        assert!(fa.is_managed(f));
                        assert!(model.insert(f.number()), "dup {f}");
                    } else {
                        assert_eq!(fa.free_count(), 0);
                    }
                }
                4 => {
                    let limit = rng.next_u64() % (total * PAGE_SIZE + 1);
                    if let Some(f) = fa.alloc_below(limit) {
                        assert!(f.start_address() + PAGE_SIZE <= limit);
                        assert!(model.insert(f.number()), "dup {f}");
                    } else {
                        // Model check: really nothing free below limit.
                        for n in 0..(limit / PAGE_SIZE).min(total) {
                            assert!(!fa.is_free(PhysFrame::from_number(n)));
                        }
                    }
                }
                5 => {
                    let count = 1 + rng.next_u64() % 8;
                    let align = 1 << (rng.next_u64() % 4);
                    if let Some(f) = fa.alloc_contiguous(count, align) {
                        assert_eq!(f.number() % align, 0);
                        for i in 0..count {
                            assert!(model.insert(f.number() + i), "dup in run");
                        }
                        runs.push((f, count));
                    }
                }
                6 if !runs.is_empty() => {
                    let idx = (rng.next_u64() as usize) % runs.len();
                    let (f, count) = runs.swap_remove(idx);
                    fa.free_contiguous(f, count).unwrap();
                    for i in 0..count {
                        assert!(model.remove(&(f.number() + i)));
                    }
                }
                _ => {
                    // Free a random single (non-run) allocated frame, or
                    // attempt a bogus free.
                    let n = rng.next_u64() % (total + 10);
                    let f = PhysFrame::from_number(n);
                    let in_run = runs
                        .iter()
                        .any(|(s, c)| (s.number()..s.number() + c).contains(&n));
                    if model.contains(&n) && !in_run {
                        fa.free(f).unwrap();
                        model.remove(&n);
                    } else if !model.contains(&n) {
                        assert!(fa.free(f).is_err());
                    }
                }
            }
            assert_eq!(fa.used_count(), model.len() as u64);
            if step % 2000 == 0 {
                check(&fa);
            }
        }
        for (f, count) in runs.drain(..) {
            fa.free_contiguous(f, count).unwrap();
            for i in 0..count {
                model.remove(&(f.number() + i));
            }
        }
        for n in model.drain() {
            fa.free(PhysFrame::from_number(n)).unwrap();
        }
        assert_eq!(fa.free_count(), baseline);
        check(&fa);
    }
}
