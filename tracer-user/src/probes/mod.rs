//! Loading the kernel programs and attaching them, one probe group at a time.
pub mod alloc;
pub mod btf;
pub mod callsites;
pub mod sparse;
pub mod symbols;
pub mod tracefs;
pub mod wrappers;

use std::{num::NonZeroU32, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLink, UProbeScope},
    },
};
use tracer_common::{
    CONN_SYSCALLS_LEN, SKIP_SYSCALLS_LEN, SWITCHES_UNKNOWN, TargetStats, ThreadState, counter, globals, group, maps,
    purge_kind, thread_flag,
};

use crate::target::Target;

/// Which groups to attach and how the alloc group learns the allocator's time.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    pub groups: u32,
    /// Allocator functions to look for: where they live says which stack frames are the
    /// allocator's. None: realloc, and an allocator not found is a note, not an error.
    pub alloc_funcs: Option<Vec<String>>,
    /// Time every call of them with a uprobe pair (exact per-call latency, ~0.9 us a call)
    /// instead of from the sampler's stacks.
    pub alloc_calls: bool,
    pub syscall_probes: SyscallProbes,
}

/// What a group does, in auto mode, with a wrapper whose uprobe would be stepped out of line
/// (~12 us a hit on this project's VMs instead of ~1): `Probe` where calls are rare (purges),
/// `Skip` where a storm makes them frequent and the group can do without (setsockopt),
/// `Fallback` to the tracepoints where every iteration would pay (epoll waits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stepped {
    Probe,
    Skip,
    Fallback,
}

/// How the loop, purge and net groups see the syscalls they time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SyscallProbes {
    /// fentry on the kernel's epoll wait where the kernel allows it; uprobes on the target's
    /// libc wrappers where it has them; syscall tracepoints elsewhere.
    #[default]
    Auto,
    /// Uprobes on the target's libc wrappers only; an error where it has none.
    Libc,
    /// Syscall tracepoints: every syscall on the host takes the kernel's slow path meanwhile.
    Tracepoints,
}

impl ProbeConfig {
    /// `alloc_calls` implies the alloc group; sampled allocator time needs the stacks group.
    pub fn new(groups: u32, alloc_funcs: Option<Vec<String>>, alloc_calls: bool) -> Self {
        let mut groups = groups;
        if alloc_calls {
            groups |= group::ALLOC;
        } else if groups & group::ALLOC != 0 {
            groups |= group::STACKS;
        }
        Self { groups, alloc_funcs, alloc_calls, syscall_probes: SyscallProbes::default() }
    }

    pub fn with_syscall_probes(self, syscall_probes: SyscallProbes) -> Self {
        Self { syscall_probes, ..self }
    }

    fn funcs(&self) -> Vec<String> {
        self.alloc_funcs.clone().unwrap_or_else(|| vec!["realloc".to_string()])
    }
}

/// The loaded programs; dropping it detaches every link and unloads everything.
pub struct Probes {
    pub ebpf: Ebpf,
    /// Human-readable list of what got attached, for the startup banner.
    pub attached: Vec<String>,
    /// What this kernel could not do and what stands in for it.
    pub notes: Vec<String>,
    net: NetGlobals,
    /// Iterations begin where a program first sees the thread out of epoll_wait, so the
    /// epoll exits need no program (false where pt_regs has no syscall number).
    lazy_begin: bool,
    /// Where the alloc group found the target's allocator.
    pub alloc_symbols: Vec<alloc::AllocSymbol>,
    /// Every link, taken from its program so that `drop` can detach them all at once.
    links: Vec<Box<dyn Send>>,
    /// vmlinux BTF for the tp_btf and fentry programs, parsed once: tens of MB, read by up
    /// to four attaches.
    btf: Option<aya::Btf>,
    /// Where purge wrappers are probed at their return, the learning of their call sites.
    purge_sites: Option<callsites::Learner>,
}

impl Drop for Probes {
    /// Detaching a tracepoint waits for RCU grace periods, about 75 ms a link on this
    /// project's VMs: one after another, Ctrl-C took over 2 s. From threads of their own the
    /// waits overlap. A thread that cannot start drops its link here, as before.
    fn drop(&mut self) {
        std::thread::scope(|s| {
            for link in self.links.drain(..) {
                let _ = std::thread::Builder::new().spawn_scoped(s, move || drop(link));
            }
        });
    }
}

/// bpf(2)'s BPF_NOEXIST map update flag.
const BPF_NOEXIST: u64 = 1;

/// Calls at least this long get a stack.
const STACK_MIN_NS: u64 = 1_000_000;
/// Stacks of a stalled iteration: one per 10 ms of it.
pub const STACK_EVERY_NS: u64 = 10_000_000;

/// The sampler's period, for stacks and for the syscalls group's on-CPU time alike. 1 kHz
/// cost Redis 3% more throughput than 100 Hz on this project's VMs (a timer interrupt is a
/// VM exit), so syscall time comes in 10 ms steps; time asleep in a syscall stays exact.
pub const SAMPLE_PERIOD_NS: u64 = 10_000_000;

/// Where the user registers sit in `struct pt_regs` on this architecture.
struct RegsGlobals {
    ip: u64,
    sp: u64,
    bp: u64,
    /// Where the syscall number sits, and the register that holds -ENOSYS during a syscall
    /// (x86's orig_ax and ax; arm64 marks non-syscalls in `syscallno` alone: no second check).
    sysnr: u64,
    ret: u64,
}

impl RegsGlobals {
    fn read(types: &btf::KernelTypes) -> Result<Self> {
        let (sysnr, ret) = match types.offset("pt_regs", "orig_ax") {
            Ok(nr) => (nr, types.offset("pt_regs", "ax")?),
            Err(_) => (types.offset("pt_regs", "syscallno").unwrap_or(u64::MAX), u64::MAX),
        };
        Ok(Self {
            ip: types.offset("pt_regs", "ip")?,
            sp: types.offset("pt_regs", "sp")?,
            bp: types.offset("pt_regs", "bp")?,
            sysnr,
            ret,
        })
    }
}

/// Where the raw sched tracepoints find a task's ids and state.
struct TaskGlobals {
    tgid: u64,
    pid: u64,
    state: u64,
    nvcsw: u64,
    nivcsw: u64,
    runtime: u64,
}

impl TaskGlobals {
    fn read(types: &btf::KernelTypes) -> Result<Self> {
        // 5.14 renamed `state` to `__state` so that nobody reads it without READ_ONCE.
        let state = types.offset("task_struct", "__state").or_else(|_| types.offset("task_struct", "state"))?;
        Ok(Self {
            tgid: types.offset("task_struct", "tgid")?,
            pid: types.offset("task_struct", "pid")?,
            state,
            nvcsw: types.offset("task_struct", "nvcsw")?,
            nivcsw: types.offset("task_struct", "nivcsw")?,
            runtime: types.offset("task_struct", "se.sum_exec_runtime")?,
        })
    }
}

/// What the net group's programs need to know about this kernel.
struct NetGlobals {
    types: btf::KernelTypes,
    skc_num: u64,
    ack_backlog: u64,
    max_ack_backlog: u64,
    /// u64::MAX when this kernel's kfree_skb has no TCP_LISTEN_OVERFLOW reason or no rx_sk.
    overflow_reason: u64,
    kfree_reason: u64,
    kfree_rx_sk: u64,
    rst_sport: u64,
    rst_sport_in_sockaddr: u64,
}

impl NetGlobals {
    fn read() -> Result<Self> {
        let types = btf::KernelTypes::load()?;
        let kfree = |f| tracefs::optional_field_offset("skb", "kfree_skb", f);
        let (kfree_reason, kfree_rx_sk, reason) = match (
            kfree("reason"),
            kfree("rx_sk"),
            tracefs::enum_value("skb", "kfree_skb", "TCP_LISTEN_OVERFLOW"),
        ) {
            (Some(r), Some(sk), Some(v)) => (r, sk, v),
            _ => (0, 0, u64::MAX),
        };
        // 6.10 replaced tcp_send_reset's sport with a sockaddr (port in network order at +2).
        let (rst_sport, in_sockaddr) = match tracefs::optional_field_offset("tcp", "tcp_send_reset", "sport") {
            Some(off) => (off, 0),
            None => (tracefs::optional_field_offset("tcp", "tcp_send_reset", "saddr").unwrap_or(u64::MAX - 2) + 2, 1),
        };
        Ok(Self {
            skc_num: types.offset("sock", "__sk_common.skc_num")?,
            ack_backlog: types.offset("sock", "sk_ack_backlog")?,
            max_ack_backlog: types.offset("sock", "sk_max_ack_backlog")?,
            overflow_reason: reason,
            kfree_reason,
            kfree_rx_sk,
            rst_sport,
            rst_sport_in_sockaddr: in_sockaddr,
            types,
        })
    }
}

impl Probes {
    /// Loads a program set that traces process `pid`, reporting iterations of at least
    /// `threshold_ns`.
    pub fn load(config: &ProbeConfig, pid: u32, threshold_ns: u64) -> Result<Self> {
        tracefs::ensure_mounted()?;
        let skip = skip_syscalls(config.groups);
        let conn = syscall_set::<CONN_SYSCALLS_LEN>(&CONN.map(|c| c.1));
        let accept = syscall_set::<2>(&ACCEPT_NRS);
        let net = NetGlobals::read()?;
        let regs = RegsGlobals::read(&net.types)?;
        let task = TaskGlobals::read(&net.types)?;
        let on = |g: u32| u64::from(config.groups & g != 0);
        let lazy = u64::from(regs.sysnr != u64::MAX);
        let ebpf = EbpfLoader::new()
            .override_global(globals::TARGET_TGID, &pid, true)
            .override_global(globals::THRESHOLD_NS, &threshold_ns, true)
            .override_global(globals::TASK_TGID_OFF, &task.tgid, true)
            .override_global(globals::TASK_PID_OFF, &task.pid, true)
            .override_global(globals::TASK_STATE_OFF, &task.state, true)
            .override_global(globals::TASK_NVCSW_OFF, &task.nvcsw, true)
            .override_global(globals::TASK_NIVCSW_OFF, &task.nivcsw, true)
            .override_global(globals::TASK_RUNTIME_OFF, &task.runtime, true)
            .override_global(globals::SYSCALLS_ON, &on(group::SYSCALLS), true)
            .override_global(globals::LAZY_BEGIN, &lazy, true)
            .override_global(globals::EPOLL_SYSCALLS, &syscall_set::<3>(&EPOLL_NRS), true)
            .override_global(globals::SKIP_SYSCALLS, &skip, true)
            .override_global(globals::CONN_SYSCALLS, &conn, true)
            .override_global(globals::ACCEPT_SYSCALLS, &accept, true)
            .override_global(globals::SKC_NUM_OFF, &net.skc_num, true)
            .override_global(globals::SK_ACK_BACKLOG_OFF, &net.ack_backlog, true)
            .override_global(globals::SK_MAX_ACK_BACKLOG_OFF, &net.max_ack_backlog, true)
            .override_global(globals::LISTEN_OVERFLOW_REASON, &net.overflow_reason, true)
            .override_global(globals::KFREE_REASON_OFF, &net.kfree_reason, true)
            .override_global(globals::KFREE_RX_SK_OFF, &net.kfree_rx_sk, true)
            .override_global(globals::RST_SPORT_OFF, &net.rst_sport, true)
            .override_global(globals::RST_SPORT_IN_SOCKADDR, &net.rst_sport_in_sockaddr, true)
            .override_global(globals::STACKS_ON, &on(group::STACKS), true)
            .override_global(globals::PARK_ON, &on(group::PARK), true)
            .override_global(globals::STACK_MIN_NS, &STACK_MIN_NS, true)
            .override_global(globals::SAMPLE_PERIOD_NS, &SAMPLE_PERIOD_NS, true)
            .override_global(globals::STACK_EVERY_NS, &STACK_EVERY_NS, true)
            .override_global(globals::PT_REGS_IP_OFF, &regs.ip, true)
            .override_global(globals::PT_REGS_SP_OFF, &regs.sp, true)
            .override_global(globals::PT_REGS_BP_OFF, &regs.bp, true)
            .override_global(globals::PT_REGS_SYSNR_OFF, &regs.sysnr, true)
            .override_global(globals::PT_REGS_RET_OFF, &regs.ret, true)
            .load(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer")))
            .context("loading the eBPF object")?;
        Ok(Self {
            ebpf,
            attached: Vec::new(),
            notes: Vec::new(),
            net,
            lazy_begin: lazy != 0,
            alloc_symbols: Vec::new(),
            links: Vec::new(),
            btf: None,
            purge_sites: None,
        })
    }

    pub fn attach(&mut self, config: &ProbeConfig, target: &Target) -> Result<()> {
        if config.groups & group::LOOP == 0 {
            bail!("the loop group cannot be switched off: it defines iterations");
        }
        if config.groups & group::PURGE != 0 {
            self.attach_purge(target, config.syscall_probes)?;
        }
        // The park group keeps its sleep bookkeeping in the same sched_switch program.
        // The syscalls group learns from sched_switch which syscall a thread slept in.
        // Lazy iteration starts take the time a loop thread got back on CPU from it too.
        if self.lazy_begin || config.groups & (group::SCHED | group::PARK | group::SYSCALLS) != 0 {
            self.btf_tracepoint("sched_switch", "sched_switch")?;
        }
        if config.groups & group::PARK != 0 {
            self.btf_tracepoint("thread_waking", "sched_waking")?;
        }
        if config.groups & group::ALLOC != 0 {
            self.attach_alloc(target, config)?;
        }
        if config.groups & group::NET != 0 {
            self.attach_net(target, config.syscall_probes)?;
        }
        if config.groups & (group::STACKS | group::SYSCALLS) != 0 {
            self.attach_sampler(SAMPLE_PERIOD_NS)?;
        }
        // Last: epoll_enter begins tracking threads and measuring their iterations, and an
        // iteration measured before sched_switch is in place misses its off-CPU time (a
        // 100 ms epoll timeout became a 100 ms app_code stall while the groups above took
        // their time to load: BTF parsing, symbol resolution).
        self.attach_loop(target, config.syscall_probes)
    }

    /// A CPU-clock perf event on every CPU runs `stall_sample`, which looks only at a loop
    /// thread inside an iteration.
    fn attach_sampler(&mut self, period_ns: u64) -> Result<()> {
        use aya::programs::perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent};
        let p: &mut aya::programs::PerfEvent = program(&mut self.ebpf, "stall_sample")?.try_into()?;
        p.load().context("loading stall_sample")?;
        for cpu in aya::util::online_cpus().map_err(|(_, e)| e)? {
            let id = p
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Period(period_ns),
                    false,
                )
                .with_context(|| format!("attaching the stall sampler on CPU {cpu}"))?;
            self.links.push(Box::new(p.take_link(id)?));
        }
        self.attached.push(format!("perf cpu-clock every {}ms", period_ns / 1_000_000));
        Ok(())
    }

    fn attach_net(&mut self, target: &Target, mode: SyscallProbes) -> Result<()> {
        let mut stats: aya::maps::PerCpuHashMap<_, u32, TargetStats> =
            aya::maps::PerCpuHashMap::try_from(self.ebpf.map_mut(maps::TARGET_STATS).context("TARGET_STATS")?)?;
        let zero = aya::maps::PerCpuValues::try_from(vec![TargetStats::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?])?;
        stats.insert(target.pid, zero, 0)?;
        self.attach_conn_syscalls(target, mode)?;
        self.tracepoint("conn_state", "sock", &["inet_sock_set_state"])?;
        self.tracepoint("rst_sent", "tcp", &["tcp_send_reset"])?;
        self.tracepoint("rst_received", "tcp", &["tcp_receive_reset"])?;
        if self.net.overflow_reason == u64::MAX {
            self.notes.push("kfree_skb has no TCP_LISTEN_OVERFLOW reason or rx_sk here (kernel < 6.10): final-ACK overflows are counted with SYN drops".into());
        } else {
            self.tracepoint("listen_drop", "skb", &["kfree_skb"])?;
        }
        if let Err(e) = self.attach_fentry("syn_request", "tcp_conn_request") {
            self.notes.push(format!(
                "fentry on tcp_conn_request unavailable ({}): SYN overflows come from the listener's drop counter (sock_diag), sampled every 10ms",
                refusal(&e)
            ));
        }
        Ok(())
    }

    /// The connection syscalls on their own tracepoints: the net group accounts accepts and
    /// connection set-up without the syscalls group's cost on every syscall of the host.
    fn attach_conn_syscalls(&mut self, target: &Target, mode: SyscallProbes) -> Result<()> {
        let traced: Vec<(&str, i64)> = CONN.iter().filter(|c| c.2).map(|c| (c.0, c.1)).collect();
        if let Some(sites) = self.wrapper_sites(target, mode, "net", &traced, Stepped::Skip)? {
            return self.attach_sites(&["conn_call", "conn_return"], target, &sites);
        }
        let present: Vec<&str> = CONN
            .iter()
            .filter(|c| c.2 && tracefs::exists("syscalls", &format!("sys_enter_{}", c.0)))
            .map(|c| c.0)
            .collect();
        let enters: Vec<String> = present.iter().map(|n| format!("sys_enter_{n}")).collect();
        let exits: Vec<String> = present.iter().map(|n| format!("sys_exit_{n}")).collect();
        self.tracepoint("conn_enter", "syscalls", &enters.iter().map(String::as_str).collect::<Vec<_>>())?;
        self.tracepoint("conn_exit", "syscalls", &exits.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn attach_fentry(&mut self, prog: &str, func: &str) -> Result<()> {
        let btf = kernel_btf(&mut self.btf)?;
        let p: &mut aya::programs::FEntry = program(&mut self.ebpf, prog)?.try_into()?;
        p.load(func, btf)?;
        let id = p.attach()?;
        self.links.push(Box::new(p.take_link(id)?));
        self.attached.push(format!("fentry:{func}"));
        Ok(())
    }

    /// Whether SYNs and their overflows are counted exactly by fentry.
    pub fn counts_syns(&self) -> bool {
        self.attached.iter().any(|a| a == "fentry:tcp_conn_request")
    }

    fn attach_loop(&mut self, target: &Target, mode: SyscallProbes) -> Result<()> {
        // Without lazy iteration starts the exits need tracepoints anyway.
        let mode = if self.lazy_begin { mode } else { SyscallProbes::Tracepoints };
        self.attach_wait_entry(target, mode)?;
        self.tracepoint("thread_exit", "sched", &["sched_process_exit"])
    }

    /// The loop group's one per-iteration hook, the cheapest this kernel and target allow.
    fn attach_wait_entry(&mut self, target: &Target, mode: SyscallProbes) -> Result<()> {
        if mode == SyscallProbes::Auto {
            match self.attach_fentry("epoll_fentry", "do_epoll_wait") {
                Ok(()) => return Ok(()),
                Err(e) => self.notes.push(format!(
                    "loop group: fentry on do_epoll_wait unavailable ({}): uprobes on the target's epoll wrappers instead, a trap per loop iteration",
                    refusal(&e)
                )),
            }
        }
        if let Some(sites) = self.wrapper_sites(target, mode, "loop", &EPOLL_WRAPPERS, Stepped::Fallback)? {
            return self.attach_sites(&["epoll_call"], target, &sites);
        }
        // epoll_pwait2 arrived in 5.11 and epoll_wait is absent on arm64: take what exists.
        let waits: Vec<&str> = ["epoll_wait", "epoll_pwait", "epoll_pwait2"]
            .into_iter()
            .filter(|w| tracefs::exists("syscalls", &format!("sys_enter_{w}")))
            .collect();
        if waits.is_empty() {
            bail!("this kernel has no syscalls:sys_enter_epoll_* tracepoints (CONFIG_FTRACE_SYSCALLS)");
        }
        let enters: Vec<String> = waits.iter().map(|w| format!("sys_enter_{w}")).collect();
        self.tracepoint("epoll_enter", "syscalls", &enters.iter().map(String::as_str).collect::<Vec<_>>())?;
        if !self.lazy_begin {
            self.notes.push("pt_regs has no syscall number on this architecture: the epoll exits are probed too".into());
            let exits: Vec<String> = waits.iter().map(|w| format!("sys_exit_{w}")).collect();
            self.tracepoint("epoll_exit", "syscalls", &exits.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        Ok(())
    }

    fn attach_purge(&mut self, target: &Target, mode: SyscallProbes) -> Result<()> {
        let wrappers = [
            ("madvise", purge_kind::MADVISE as i64),
            ("munmap", purge_kind::MUNMAP as i64),
            ("mremap", purge_kind::MREMAP as i64),
        ];
        if let Some(sites) = self.wrapper_sites(target, mode, "purge", &wrappers, Stepped::Probe)? {
            return self.attach_purge_wrappers(target.pid, &sites);
        }
        self.tracepoint("madvise_enter", "syscalls", &["sys_enter_madvise"])?;
        self.tracepoint("munmap_enter", "syscalls", &["sys_enter_munmap"])?;
        self.tracepoint("mremap_enter", "syscalls", &["sys_enter_mremap"])?;
        self.tracepoint("purge_exit", "syscalls", &["sys_exit_madvise", "sys_exit_munmap", "sys_exit_mremap"])
    }

    fn attach_alloc(&mut self, target: &Target, config: &ProbeConfig) -> Result<()> {
        let funcs = config.funcs();
        let symbols = alloc::resolve(target, &funcs)?;
        if symbols.is_empty() {
            let msg = format!(
                "PID {} maps no object defining {} (looked in the executable and its libraries)",
                target.pid,
                funcs.join(", ")
            );
            if config.alloc_calls || config.alloc_funcs.is_some() {
                bail!(msg);
            }
            self.notes.push(format!("{msg}: allocator time stays in app_code"));
        }
        if config.alloc_calls {
            self.attach_alloc_uprobes(target, &symbols)?;
        } else {
            let names: Vec<String> = symbols.iter().map(|s| format!("{}:{}", s.object.display(), s.symbol)).collect();
            self.attached.push(format!("allocator frames in sampled stacks ({})", names.join(", ")));
        }
        self.alloc_symbols = symbols;
        Ok(())
    }

    fn attach_alloc_uprobes(&mut self, target: &Target, symbols: &[alloc::AllocSymbol]) -> Result<()> {
        let pid = NonZeroU32::new(target.pid).ok_or_else(|| anyhow!("PID 0"))?;
        for prog in ["alloc_enter", "alloc_exit"] {
            for s in symbols {
                let at = UProbeAttachLocation::Symbol(&s.symbol);
                let link = self
                    .uprobe(prog, &s.open_path, at, 0, pid)
                    .with_context(|| format!("on {}:{}", s.object.display(), s.symbol))?;
                self.links.push(Box::new(link));
            }
        }
        for s in symbols {
            self.attached.push(format!("uprobe {}:{}", s.object.display(), s.symbol));
        }
        Ok(())
    }

    /// The probe sites of the target's wrappers among `wanted` (name, attach cookie), or None
    /// where the group falls back to syscall tracepoints.
    fn wrapper_sites(
        &mut self,
        target: &Target,
        mode: SyscallProbes,
        group: &str,
        wanted: &[(&str, i64)],
        stepped: Stepped,
    ) -> Result<Option<Vec<(wrappers::Site, u64)>>> {
        if mode == SyscallProbes::Tracepoints {
            return Ok(None);
        }
        let names: Vec<&str> = wanted.iter().map(|w| w.0).collect();
        let mut sites = wrappers::sites(target, &names)?;
        let slow: Vec<String> = sites.iter().filter(|s| !s.emulated).map(|s| s.binding.symbol.clone()).collect();
        let tracepoints = |why: String| {
            format!("{group} group: {why}: syscall tracepoints instead, which slow every syscall on the host while attached")
        };
        if sites.is_empty() {
            let msg = format!("PID {} maps no object defining {}", target.pid, names.join(", "));
            if mode == SyscallProbes::Libc {
                bail!("{msg} (--syscall-probes tracepoints probes the syscalls instead)");
            }
            self.notes.push(tracepoints(msg));
            return Ok(None);
        }
        if mode == SyscallProbes::Auto && !slow.is_empty() {
            let why = format!(
                "a uprobe on {} would trap twice a call (no emulated instruction before the syscall)",
                slow.join(", ")
            );
            match stepped {
                Stepped::Probe => {}
                Stepped::Skip => {
                    self.notes.push(format!("{group} group: {why}: those calls are not timed"));
                    sites.retain(|s| s.emulated);
                }
                Stepped::Fallback => {
                    self.notes.push(tracepoints(why));
                    return Ok(None);
                }
            }
        }
        let cookie = |name: &str| wanted.iter().find(|w| w.0 == name).map_or(0, |w| w.1 as u64);
        let with_cookies = sites.into_iter().map(|s| {
            let c = cookie(&s.binding.symbol);
            (s, c)
        });
        Ok(Some(with_cookies.collect()))
    }

    /// Uprobe (and uretprobe) programs on every site, pid-scoped: no other process pays.
    fn attach_sites(&mut self, progs: &[&str], target: &Target, sites: &[(wrappers::Site, u64)]) -> Result<()> {
        let pid = NonZeroU32::new(target.pid).ok_or_else(|| anyhow!("PID 0"))?;
        for prog in progs {
            for (site, cookie) in sites {
                let at = UProbeAttachLocation::SymbolOffset(&site.binding.symbol, site.offset);
                let link = self
                    .uprobe(prog, &site.binding.open_path, at, *cookie, pid)
                    .with_context(|| format!("on {}", site.describe()))?;
                self.links.push(Box::new(link));
            }
        }
        let kind = if progs.len() > 1 { "uprobes+uretprobes" } else { "uprobes" };
        let names: Vec<String> = sites.iter().map(|(s, _)| s.describe()).collect();
        self.attached.push(format!("{kind} {}", names.join(" ")));
        Ok(())
    }

    /// `prog` (loaded on first use) on `path` at `location`, for process `pid` only.
    fn uprobe(
        &mut self,
        prog: &str,
        path: &Path,
        location: UProbeAttachLocation,
        cookie: u64,
        pid: NonZeroU32,
    ) -> Result<UProbeLink> {
        let p: &mut UProbe = program(&mut self.ebpf, prog)?.try_into()?;
        if p.fd().is_err() {
            p.load().with_context(|| format!("loading {prog}"))?;
        }
        let point = UProbeAttachPoint { location, cookie: Some(cookie) };
        let id = p
            .attach(point, path, UProbeScope::OneProcess(pid))
            .with_context(|| format!("attaching {prog} to {}", path.display()))?;
        Ok(p.take_link(id)?)
    }

    fn tracepoint(&mut self, prog: &str, category: &str, names: &[&str]) -> Result<()> {
        let p: &mut TracePoint = program(&mut self.ebpf, prog)?.try_into()?;
        p.load().with_context(|| format!("loading {prog}"))?;
        for name in names {
            let id = p.attach(category, name).with_context(|| format!("attaching {prog} to {category}:{name}"))?;
            self.links.push(Box::new(p.take_link(id)?));
            self.attached.push(format!("{category}:{name}"));
        }
        Ok(())
    }

    /// Threads already asleep in epoll_wait at attach would otherwise be first seen at their
    /// next wait, a whole iteration late (no program runs at the wait's return): they get
    /// their state now, from /proc/PID/task/TID/syscall.
    pub fn seed_waiting_threads(&mut self, pid: u32) -> Result<()> {
        if !self.lazy_begin {
            return Ok(());
        }
        let mut threads: aya::maps::HashMap<_, u32, ThreadState> =
            aya::maps::HashMap::try_from(self.ebpf.map_mut(maps::THREADS).context("THREADS map")?)?;
        let now = crate::report::clock_ns(libc::CLOCK_MONOTONIC);
        for tid in waiting_in_epoll(pid) {
            let state = ThreadState {
                tgid: pid,
                flags: thread_flag::IN_EPOLL,
                resume_ns: now,
                switches: SWITCHES_UNKNOWN,
                ..Default::default()
            };
            // NOEXIST: a thread that reached epoll_wait meanwhile keeps the kernel's entry.
            let _ = threads.insert(tid, state, BPF_NOEXIST);
        }
        Ok(())
    }

    /// A tp_btf program (Linux 5.5): no record is formatted for it, which matters on hooks
    /// that fire for every task on the host, and the task pointers it hands over are typed,
    /// so the program reads their fields with plain loads.
    fn btf_tracepoint(&mut self, prog: &str, name: &str) -> Result<()> {
        let btf = kernel_btf(&mut self.btf)?;
        let p: &mut aya::programs::BtfTracePoint = program(&mut self.ebpf, prog)?.try_into()?;
        p.load(name, btf).with_context(|| format!("loading {prog} as tp_btf/{name} (needs Linux 5.5)"))?;
        let id = p.attach().with_context(|| format!("attaching {prog} to tp_btf/{name}"))?;
        self.links.push(Box::new(p.take_link(id)?));
        self.attached.push(format!("tp_btf:{name}"));
        Ok(())
    }

    /// Sum over CPUs of one `COUNTERS` slot.
    pub fn counter(&self, index: u32) -> Result<u64> {
        let map: PerCpuArray<_, u64> =
            PerCpuArray::try_from(self.ebpf.map(maps::COUNTERS).context("COUNTERS map")?)?;
        Ok(map.get(&index, 0)?.iter().sum())
    }

    pub fn lost_stalls(&self) -> u64 {
        self.counter(counter::LOST_STALLS).unwrap_or(0)
    }

    /// Run time (ns) and runs of every loaded program of ours (counted while BPF run-time
    /// stats are enabled).
    pub fn run_stats(&self) -> (u64, u64) {
        self.ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok())
            .fold((0, 0), |(ns, n), i| (ns + i.run_time().as_nanos() as u64, n + i.run_count()))
    }

    pub fn lost_stacks(&self) -> u64 {
        self.counter(counter::LOST_STACKS).unwrap_or(0)
    }

    pub fn late_begins(&self) -> u64 {
        self.counter(counter::LATE_BEGIN).unwrap_or(0)
    }

    pub fn untimed_purges(&self) -> u64 {
        self.counter(counter::UNTIMED_PURGES).unwrap_or(0)
    }

    pub fn untracked_threads(&self) -> u64 {
        self.counter(counter::THREADS_FULL).unwrap_or(0)
    }

    pub fn threads_without_histogram(&self) -> u64 {
        self.counter(counter::HISTS_FULL).unwrap_or(0)
    }
}

/// Syscalls that set up or tear down a connection: (tracepoint name, number, whether the net
/// group traces it on its own tracepoint). Time in any of them is connection handling; the
/// net group traces those a connection makes once each, and leaves epoll_ctl, fcntl and ioctl
/// to the syscalls group: clients and servers call them per request (BENCHMARKS.md), and in a
/// burst the loop's own time counts as connection handling anyway.
const CONN: [(&str, i64, bool); 11] = [
    ("accept", libc::SYS_accept, true),
    ("accept4", libc::SYS_accept4, true),
    ("close", libc::SYS_close, true),
    ("shutdown", libc::SYS_shutdown, true),
    ("setsockopt", libc::SYS_setsockopt, true),
    ("getsockopt", libc::SYS_getsockopt, true),
    ("getpeername", libc::SYS_getpeername, true),
    ("getsockname", libc::SYS_getsockname, true),
    ("fcntl", libc::SYS_fcntl, false),
    ("ioctl", libc::SYS_ioctl, false),
    ("epoll_ctl", libc::SYS_epoll_ctl, false),
];
const ACCEPT_NRS: [i64; 2] = [libc::SYS_accept, libc::SYS_accept4];
/// The loop group's wrappers; the cookie is unused.
const EPOLL_WRAPPERS: [(&str, i64); 3] = [("epoll_wait", 0), ("epoll_pwait", 0), ("epoll_pwait2", 0)];
#[cfg(target_arch = "x86_64")]
const EPOLL_NRS: [i64; 3] = [libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2];
#[cfg(not(target_arch = "x86_64"))]
const EPOLL_NRS: [i64; 2] = [libc::SYS_epoll_pwait, libc::SYS_epoll_pwait2];

/// Threads of `pid` blocked in an epoll wait right now.
fn waiting_in_epoll(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&tid| crate::stacks::parked::blocked(pid, tid).is_some_and(|b| EPOLL_NRS.contains(&(b.nr as i64))))
        .collect()
}

fn syscall_set<const N: usize>(nrs: &[i64]) -> [u64; N] {
    let mut set = [u64::MAX; N];
    for (slot, nr) in set.iter_mut().zip(nrs) {
        *slot = *nr as u64;
    }
    set
}

/// Why the kernel would not take a program, in a few words: the loader's own message repeats
/// the errno and appends an empty verifier log when the refusal is a policy (EPERM: a kernel
/// that forbids fentry) rather than the program.
fn refusal(e: &anyhow::Error) -> String {
    let os = e.chain().find_map(|c| c.downcast_ref::<std::io::Error>().and_then(std::io::Error::raw_os_error));
    match os {
        Some(libc::EPERM) => "the kernel refuses it: EPERM".into(),
        _ => format!("{e:#}"),
    }
}

/// The parsed vmlinux BTF in `slot`, parsing it on first use. A free function over the one
/// field, so that callers can borrow the programs alongside it.
fn kernel_btf(slot: &mut Option<aya::Btf>) -> Result<&aya::Btf> {
    if slot.is_none() {
        *slot = Some(aya::Btf::from_sys_fs().context("reading /sys/kernel/btf/vmlinux")?);
    }
    Ok(slot.as_ref().expect("just filled"))
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))
}

/// Syscalls that attached groups account for, which the syscalls group must not count twice.
/// The net group's timed calls need no entry: the sampler leaves a call being timed alone,
/// and counts the connection calls left untimed (a stepped wrapper's) as connection work.
fn skip_syscalls(groups: u32) -> [u64; SKIP_SYSCALLS_LEN] {
    let mut nrs = EPOLL_NRS.to_vec();
    if groups & group::PURGE != 0 {
        nrs.extend([libc::SYS_madvise, libc::SYS_munmap, libc::SYS_mremap]);
    }
    let mut skip = [u64::MAX; SKIP_SYSCALLS_LEN];
    for (slot, nr) in skip.iter_mut().zip(nrs) {
        *slot = nr as u64;
    }
    skip
}
