//! One vCPU thread: the `KVM_RUN` loop, the program's events, and the kick that stops it.
//!
//! # Kick protocol
//! [`VcpuControl::kick`] raises `stop`, then signals the vCPU thread ([`KICK_SIGNAL`]) and
//! unparks it. The signal handler sets `immediate_exit` in the thread's `kvm_run` (found
//! through a thread-local pointer), so whichever moment the signal lands — inside `KVM_RUN`
//! (which returns `EINTR`), just before it (the next `KVM_RUN` returns at once) or while the
//! thread sleeps for the guest (the unpark wakes it) — the loop sees `stop` before it runs
//! guest code again. On a stop the thread completes any pending port I/O with one more
//! `KVM_RUN` under `immediate_exit` (as KVM documents for saving state), then saves the
//! vCPU's state: the guest resumes elsewhere exactly after its last instruction.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Once, OnceLock};
use std::thread::Thread;
use std::time::Duration;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::program::{mailbox as mb, Event, EVENT_PORT};
use super::vm::{Mailboxes, VcpuState};
use crate::sys::clock::now_ns;

thread_local! {
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

/// See [`kick_signal`].
pub const KICK_SIGNAL: &str = "SIGRTMIN+1";

extern "C" fn on_kick(_: libc::c_int) {
    // Async-signal-safe: a const-initialised thread local and one volatile store.
    KVM_RUN.with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is this thread's live kvm_run mapping (cleared before the
            // vCPU is dropped).
            unsafe { std::ptr::write_volatile(&mut (*p).immediate_exit, 1) };
        }
    });
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler that only does the async-signal-safe store above; no
        // SA_RESTART, so KVM_RUN returns EINTR.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

/// Shared between a vCPU thread and whoever stops it.
#[derive(Debug, Default)]
pub struct VcpuControl {
    stop: AtomicBool,
    pthread: AtomicU64,
    thread: OnceLock<Thread>,
    tid: AtomicU32,
    started: AtomicBool,
}

impl VcpuControl {
    /// Asks the vCPU to stop and save its state, wherever it is.
    pub fn kick(&self) {
        // SeqCst: ordered before the signal, which the thread reacts to by reading `stop`.
        self.stop.store(true, Ordering::SeqCst);
        // Relaxed: set once by the vCPU thread before it first runs the guest; a kick before
        // that is seen by the loop's first check.
        let pt = self.pthread.load(Ordering::Relaxed);
        if pt != 0 {
            // SAFETY: the vCPU thread is alive while `pthread` is non-zero (it clears it
            // before exiting).
            unsafe { libc::pthread_kill(pt as libc::pthread_t, kick_signal()) };
        }
        self.wake();
    }

    /// Wakes the thread if it sleeps for the guest (an idle or pacing vCPU).
    pub fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    /// The vCPU thread's kernel thread id (0 until it runs): userfaultfd reports it.
    pub fn tid(&self) -> u32 {
        // Relaxed: set once before the guest runs; read when a fault of that thread arrives.
        self.tid.load(Ordering::Relaxed)
    }

    /// Whether the program reported [`Event::Started`].
    pub fn started(&self) -> bool {
        // Relaxed: a polled flag.
        self.started.load(Ordering::Relaxed)
    }

    fn stopping(&self) -> bool {
        // SeqCst: pairs with `kick`.
        self.stop.load(Ordering::SeqCst)
    }
}

/// How a vCPU thread ended.
#[derive(Debug)]
pub enum VcpuEnd {
    /// Kicked: its state, to resume elsewhere.
    Stopped(Box<VcpuState>),
    /// The program reported [`Event::Done`].
    Done,
    /// The guest crashed or KVM failed.
    Failed(String),
}

/// What the run loop needs besides the vCPU.
pub struct VcpuEnv<'a> {
    /// Index.
    pub index: u32,
    /// Status pages.
    pub mailboxes: &'a Mailboxes,
    /// TSC kHz (to turn the guest's sleep requests into time).
    pub tsc_khz: u32,
    /// Harvests this vCPU's dirty ring when KVM says it is full (dirty-ring tracking).
    pub ring_full: Option<&'a (dyn Fn(u32) -> Result<(), String> + Sync)>,
    /// Sleep requests return at once: the program spins until due.
    pub spin: bool,
}

const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// Runs `vcpu` until it is kicked (its state is saved), its program is done, or it fails.
pub fn run(vcpu: &mut VcpuFd, ctl: &VcpuControl, env: &VcpuEnv<'_>) -> VcpuEnd {
    install_kick_handler();
    let _ = ctl.thread.set(std::thread::current());
    // SAFETY: gettid has no preconditions.
    ctl.tid
        .store(unsafe { libc::gettid() } as u32, Ordering::Relaxed);
    KVM_RUN.with(|p| p.set(vcpu.get_kvm_run() as *mut kvm_run));
    // SAFETY: pthread_self has no preconditions.
    ctl.pthread
        .store(unsafe { libc::pthread_self() } as u64, Ordering::Relaxed);
    let end = run_loop(vcpu, ctl, env);
    // Relaxed: no signal is sent once this is 0 (`kick` reads it).
    ctl.pthread.store(0, Ordering::Relaxed);
    KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
    end
}

fn run_loop(vcpu: &mut VcpuFd, ctl: &VcpuControl, env: &VcpuEnv<'_>) -> VcpuEnd {
    let i = env.index;
    loop {
        if ctl.stopping() {
            // Complete a pending `out` (KVM finishes it on the next entry), then save.
            vcpu.set_kvm_immediate_exit(1);
            let _ = vcpu.run();
            vcpu.set_kvm_immediate_exit(0);
            return match VcpuState::save(vcpu) {
                Ok(mut s) => {
                    // The program's clock, not the raw TSC, is what must resume.
                    s.tsc = s.tsc.wrapping_add(env.mailboxes.read(i, mb::CLOCK_OFFSET));
                    VcpuEnd::Stopped(Box::new(s))
                }
                Err(e) => VcpuEnd::Failed(format!("vCPU {i}: saving state: {e}")),
            };
        }
        let exit = vcpu.run();
        match exit {
            Ok(VcpuExit::IoOut(EVENT_PORT, data)) => {
                match data.first().copied().and_then(Event::from_code) {
                    Some(Event::Started) => {
                        // Relaxed: a polled flag.
                        ctl.started.store(true, Ordering::Relaxed);
                    }
                    Some(Event::Sleep) => {
                        let ticks = env.mailboxes.read(i, mb::SLEEP_TSC);
                        let ns =
                            (u128::from(ticks) * 1_000_000 / u128::from(env.tsc_khz.max(1))) as u64;
                        if !env.spin {
                            sleep_unless_stopped(ctl, env, ns.min(1_000_000_000));
                        }
                    }
                    Some(Event::Done) => return VcpuEnd::Done,
                    None => {
                        return VcpuEnd::Failed(format!("vCPU {i}: unknown event {data:?}"));
                    }
                }
            }
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => {
                let Some(harvest) = env.ring_full else {
                    return VcpuEnd::Failed(format!("vCPU {i}: dirty ring full without a ring"));
                };
                if let Err(e) = harvest(i) {
                    return VcpuEnd::Failed(format!(
                        "vCPU {i}: harvesting its full dirty ring: {e}"
                    ));
                }
            }
            Ok(other) => {
                let what = format!("{other:?}");
                let regs = vcpu
                    .get_regs()
                    .map(|r| format!("rip {:#x} rsp {:#x}", r.rip, r.rsp));
                return VcpuEnd::Failed(format!(
                    "vCPU {i}: unexpected exit {what} ({})",
                    regs.unwrap_or_else(|e| e.to_string())
                ));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // Kicked (or a stray signal): clear the flag the handler set and re-check.
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => return VcpuEnd::Failed(format!("vCPU {i}: KVM_RUN: {e}")),
        }
    }
}

/// Sleeps `ns` for the guest, waking early when kicked or asked to stop.
fn sleep_unless_stopped(ctl: &VcpuControl, env: &VcpuEnv<'_>, ns: u64) {
    let deadline = now_ns() + ns;
    loop {
        if ctl.stopping() || env.mailboxes.read(env.index, mb::STOP) != 0 {
            return;
        }
        let now = now_ns();
        if now >= deadline {
            return;
        }
        std::thread::park_timeout(Duration::from_nanos(deadline - now));
    }
}
