//! Stack records from the kernel, unwound and symbolized as they arrive (while the target
//! and its mappings are still there), kept per iteration until that iteration's stall is
//! reported.
use std::collections::{BTreeMap, HashMap};

use aya::maps::{MapData, RingBuf, StackTraceMap};
use serde::Serialize;
use tracer_common::{StackEvent, stack_kind};

use super::{allocator::AllocatorFrames, parked, symbolize::Symbols, unwind::Unwinder};

/// Stacks of iterations whose stall never came (shorter than the threshold after all) are
/// dropped after this long.
const KEEP_NS: u64 = 120_000_000_000;
/// Distinct stacks a stall record carries.
pub const STACKS_PER_STALL: usize = 5;

/// One distinct stack and the stall time it stands for.
#[derive(Clone, Debug, Serialize)]
pub struct WeightedStack {
    /// Root first, leaf last; kernel frames (prefixed "[k] ") after the user ones.
    pub frames: Vec<String>,
    pub weight_ns: u64,
    /// Where it was taken: "purge", "syscall", "alloc", "sample" (CPU timer) or "blocked"
    /// (a thread asleep in a stalled iteration, read from /proc).
    pub kind: &'static str,
    pub count: u64,
}

/// How one iteration's samples in unexplained time (no probe measured it) fell: the
/// allocator's share of them is its share of that time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocSplit {
    pub samples: u64,
    pub in_allocator: u64,
}

pub struct StackCollector {
    ring: RingBuf<MapData>,
    kstacks: StackTraceMap<MapData>,
    unwinders: HashMap<u32, Unwinder>,
    symbols: Symbols,
    by_iteration: HashMap<(u32, u64), Vec<WeightedStack>>,
    /// Set when the alloc group samples: which frames are the allocator's, and per iteration
    /// how its unexplained samples fell.
    allocator: Option<AllocatorFrames>,
    splits: HashMap<(u32, u64), AllocSplit>,
    /// Per stalled iteration, how far into it the last /proc look was.
    blocked_seen: HashMap<(u32, u64), u64>,
    pub received: u64,
}

impl StackCollector {
    pub fn new(ring: RingBuf<MapData>, kstacks: StackTraceMap<MapData>, allocator: Option<AllocatorFrames>) -> Self {
        Self {
            ring,
            kstacks,
            unwinders: HashMap::new(),
            symbols: Symbols::new(),
            by_iteration: HashMap::new(),
            allocator,
            splits: HashMap::new(),
            blocked_seen: HashMap::new(),
            received: 0,
        }
    }

    /// Unwinds and symbolizes every record waiting in the ring buffer.
    pub fn drain(&mut self, now_ns: u64) {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<StackEvent>() {
                // SAFETY: the kernel wrote a whole StackEvent; read it unaligned.
                events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<StackEvent>()) });
            }
        }
        for ev in events {
            self.received += 1;
            let stack = self.resolve(&ev);
            self.by_iteration.entry((ev.tid, ev.iter_start_ns)).or_default().push(stack);
        }
        self.by_iteration.retain(|&(_, start), _| start + KEEP_NS > now_ns);
        self.splits.retain(|&(_, start), _| start + KEEP_NS > now_ns);
        self.blocked_seen.retain(|&(_, start), _| start + KEEP_NS > now_ns);
    }

    /// A blocked loop thread's stack, read from /proc while its iteration is past the
    /// threshold: what the CPU sampler cannot see (a thread asleep takes no CPU samples), without
    /// a probe on every syscall. It stands for the time since the iteration's previous look
    /// (`seen_ns` of it was already covered).
    pub fn sample_blocked(&mut self, pid: u32, tid: u32, iter_start_ns: u64, elapsed_ns: u64, seen_ns: u64) {
        let covered = self.blocked_seen.insert((tid, iter_start_ns), elapsed_ns).unwrap_or(seen_ns);
        let weight_ns = elapsed_ns.saturating_sub(covered);
        let Some(b) = parked::blocked(pid, tid) else { return };
        let unwinder = self.unwinders.entry(pid).or_insert_with(|| Unwinder::new(pid));
        let frames = parked::stack(pid, &b, unwinder, &mut self.symbols);
        if frames.is_empty() {
            return;
        }
        self.received += 1;
        let stack = WeightedStack { frames, weight_ns, kind: "blocked", count: 1 };
        self.by_iteration.entry((tid, iter_start_ns)).or_default().push(stack);
    }

    /// The stack taken last in an iteration still going on.
    pub fn latest(&self, tid: u32, iter_start_ns: u64) -> Option<&WeightedStack> {
        self.by_iteration.get(&(tid, iter_start_ns))?.last()
    }

    /// How one iteration's unexplained samples fell (all zero when the alloc group is off).
    pub fn take_split(&mut self, tid: u32, iter_start_ns: u64) -> AllocSplit {
        self.splits.remove(&(tid, iter_start_ns)).unwrap_or_default()
    }

    /// The stacks of one iteration, identical ones merged, heaviest first.
    pub fn take(&mut self, tid: u32, iter_start_ns: u64) -> Vec<WeightedStack> {
        let mut merged: BTreeMap<(Vec<String>, &'static str), (u64, u64)> = BTreeMap::new();
        for s in self.by_iteration.remove(&(tid, iter_start_ns)).unwrap_or_default() {
            let e = merged.entry((s.frames, s.kind)).or_default();
            e.0 += s.weight_ns;
            e.1 += 1;
        }
        let mut out: Vec<WeightedStack> = merged
            .into_iter()
            .map(|((frames, kind), (weight_ns, count))| WeightedStack { frames, weight_ns, kind, count })
            .collect();
        out.sort_by_key(|w| std::cmp::Reverse(w.weight_ns));
        out
    }

    fn resolve(&mut self, ev: &StackEvent) -> WeightedStack {
        let len = (ev.stack_len as usize).min(ev.stack.len());
        let unwinder = self.unwinders.entry(ev.pid).or_insert_with(|| Unwinder::new(ev.pid));
        let user = unwinder.unwind(ev.ip, ev.sp, ev.bp, &ev.stack[..len]);
        let mut frames: Vec<String> = self.symbols.user(ev.pid, &user);
        if ev.kind == stack_kind::SAMPLE {
            self.count_sample(ev, &user, &frames);
        }
        frames.reverse();
        frames.extend(self.kernel_frames(ev.kstack_id).into_iter().map(|f| format!("[k] {f}")));
        WeightedStack { frames, weight_ns: ev.weight_ns, kind: kind_name(ev.kind), count: 1 }
    }

    fn count_sample(&mut self, ev: &StackEvent, addrs: &[u64], names: &[String]) {
        let Some(allocator) = &self.allocator else { return };
        let modules = self.symbols.modules(ev.pid, addrs);
        let inside = names.iter().zip(modules).any(|(name, module)| allocator.matches(module, name));
        let split = self.splits.entry((ev.tid, ev.iter_start_ns)).or_default();
        split.samples += 1;
        split.in_allocator += u64::from(inside);
    }

    /// Kernel frames root first (the stack map holds them leaf first).
    fn kernel_frames(&mut self, id: i32) -> Vec<String> {
        let Ok(id) = u32::try_from(id) else { return Vec::new() };
        let Ok(trace) = self.kstacks.get(&id, 0) else { return Vec::new() };
        let addrs: Vec<u64> = trace.frames().iter().map(|f| f.ip).filter(|&ip| ip != 0).collect();
        let mut names = self.symbols.kernel(&addrs);
        names.reverse();
        names
    }
}

fn kind_name(kind: u32) -> &'static str {
    match kind {
        stack_kind::PURGE => "purge",
        stack_kind::SYSCALL => "syscall",
        stack_kind::ALLOC => "alloc",
        _ => "sample",
    }
}
