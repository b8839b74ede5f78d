//! The guest program: x86-64 machine code, generated here with iced-x86's assembler, that
//! every vCPU runs from boot (long mode, identity paging, no operating system).
//!
//! # ABI
//! The host starts vCPU `i` in 64-bit mode at **CPL 3** with IOPL 3 (port I/O allowed) and
//! interrupts off, at [`CODE_GPA`], with `rdi = i`, `rsi =` [`PARAMS_GPA`](crate::guest::layout::PARAMS_GPA), `rbx =` a non-zero
//! random seed and `rsp =` the top of its stack page. (CPL 3 because the program needs no
//! privilege, and because some hosts' KVM — this project's machines run KVM on PVM —
//! emulates CPL 0 code instruction by instruction but runs CPL 3 code natively.)
//! Everything the program needs is in the parameter page ([`Params`]); everything it keeps
//! lives in registers and guest RAM, so a vCPU stopped anywhere and resumed elsewhere with the
//! same registers and memory carries on. Its clock is `rdtsc` plus an offset the host keeps
//! in the status page (a minimal pvclock, see [`mailbox::CLOCK_OFFSET`]). It reports
//! through its status page
//! ([`mailbox`]: device memory, never migrated) and wakes the host with `out` on
//! [`EVENT_PORT`] only when it must ([`Event`]).
//!
//! # Registers kept across the program
//! `r15` parameter page, `r14` status page, `r13` vCPU index, `r12` generation table,
//! `rbx` random state (or a loop bound), `rbp` the workload's position; locals on the stack.
//!
//! # Routines
//! * `check_page(rdi = page)`: the signed-page check of [`crate::guest::image`], under the
//!   generation table's seqlock (retry while the entry is odd or changes); a failure is
//!   counted and the first one recorded in the status page.
//! * `write_page(rdi = page)`: only the page's owner calls it: entry odd, re-sign with the
//!   next generation, entry even.
//! * `op_done`: counts one completed operation in `OPS` and, until `STAMPED`, stamps the
//!   program's clock: the first operation's (`FIRST_OP_CLOCK`), and the count of operations
//!   completed before the host's `WINDOW_END` (`WINDOW_OPS`), so that "time to the first
//!   unit of work" and "work done in the first T ms" are measured by the guest itself
//!   (clobbers nothing).
//! * workloads ([`Workload`]; the dispatch is `Gen::emit_workload`'s exhaustive `match`),
//!   each looping until the host sets `STOP` in the status page,
//!   then `fsck`: the vCPU checks its share of the whole data area, sets `STATE = DONE`, and
//!   reports [`Event::Done`].
//!
//! Windows: `seq` and `stream` work in the vCPU's own window (the parameter page's
//! `SEQ_WINDOWS` / `STREAM_WINDOWS` tables: one vCPU's is the layout's window, several are
//! spread over RAM, see [`crate::guest::layout`]); `mixed` plays the stream window on vCPU 0
//! and runs `kv` on the others.
//!
//! Owners: `seq` writes every eighth page of its own window; `random` writes a quarter of the
//! pages it reads that it owns (`page % vcpus == i`); `stream` writes the first page of each
//! frame of its own window; `kv` updates (re-signs) an eighth of the pages it finds keys in, if
//! it owns them. One writer per page, so the seqlock is enough.

use crate::names::code_enum;
use iced_x86::code_asm::*;
use iced_x86::IcedError;

use crate::guest::image::{
    PageFault, Params, FIRST_GEN, PAGE_TAG, SLOTS_PER_PAGE, SLOT_BASE, SUM_MUL, SUM_ROT, SUM_SEED,
};
use crate::guest::layout::{CODE_GPA, CODE_MAX};
use crate::guest::Workload;

pub use crate::guest::layout::CODE_GPA as ENTRY;

/// The I/O port the program reports events on (one byte, an [`Event`]).
pub const EVENT_PORT: u16 = 0x0ee0;

/// A stream frame due more than this many TSC ticks from now (a few ms) is slept for again
/// rather than spun for.
const RESLEEP_TSC: i32 = 1 << 24;

code_enum!(
    /// What the program tells the host through [`EVENT_PORT`].
    pub enum Event: u8 {
        /// The vCPU booted and starts its workload.
        Started = 1,
        /// Sleep `SLEEP_TSC` TSC ticks (the stream is ahead of schedule).
        Sleep = 2,
        /// Stopped and verified its share; nothing more to do.
        Done = 3,
    }
);

/// The status page of one vCPU: byte offsets of its little-endian `u64` words.
pub mod mailbox {
    /// Host → guest: non-zero asks the program to stop, verify its share and report done.
    pub const STOP: i32 = 0;
    /// Host → guest: the stream's frame interval in TSC ticks (0: unpaced).
    pub const FRAME_TSC: i32 = 8;
    /// Guest: 1 running its workload, 2 verifying, 3 done.
    pub const STATE: i32 = 16;
    /// Guest: pages checked by the workload (seq, random, stream) or lookups (kv).
    pub const OPS: i32 = 24;
    /// Guest: pages written.
    pub const WRITES: i32 = 32;
    /// Guest: failed checks.
    pub const ERRORS: i32 = 40;
    /// Guest: the first failure's [`PageFault`](crate::guest::image::PageFault) code.
    pub const ERR_KIND: i32 = 48;
    /// Guest: the first failure's global page.
    pub const ERR_PAGE: i32 = 56;
    /// Guest: word 1 found (the page number, or the value found for a key).
    pub const ERR_W1: i32 = 64;
    /// Guest: word 2 found (tag and generation, or the key).
    pub const ERR_W2: i32 = 72;
    /// Guest: the generation the table expected.
    pub const ERR_GEN: i32 = 80;
    /// Guest: stream frames played.
    pub const FRAMES: i32 = 88;
    /// Guest: the stream's longest pause, TSC ticks.
    pub const LONGEST_PAUSE: i32 = 96;
    /// Guest → host with [`Event::Sleep`](super::Event::Sleep): ticks to sleep.
    pub const SLEEP_TSC: i32 = 104;
    /// Guest: pages verified by the final check.
    pub const VERIFIED: i32 = 112;
    /// Guest: frames that ended more than one interval after they were due.
    pub const LATE_FRAMES: i32 = 120;
    /// Host → guest: added to `rdtsc` to make the program's clock (a minimal pvclock). The
    /// destination sets it so that the clock resumes where it stopped at the source.
    pub const CLOCK_OFFSET: i32 = 128;
    /// Guest: the program's clock when its first operation (an [`OPS`] count) completed
    /// since the status page was last cleared (at boot, and at every restore or migration:
    /// status pages are device memory, never saved); 0 until then.
    pub const FIRST_OP_CLOCK: i32 = 136;
    /// Host → guest: a window's end on the program's clock (0: no window). The program then
    /// counts the operations completed before it in [`WINDOW_OPS`].
    pub const WINDOW_END: i32 = 144;
    /// Guest: operations completed before [`WINDOW_END`], written by the first operation
    /// completed at or after it (until then, every operation so far completed before it).
    pub const WINDOW_OPS: i32 = 152;
    /// Guest: non-zero once nothing more is to be stamped (the first operation's clock taken
    /// and the window, if any, passed): each operation then costs one compare.
    pub const STAMPED: i32 = 160;
    /// Status page states.
    pub const RUNNING: u64 = 1;
    /// See [`STATE`].
    pub const VERIFYING: u64 = 2;
    /// See [`STATE`].
    pub const DONE: u64 = 3;
}

use mailbox as mb;

type R = Result<(), IcedError>;

struct Gen {
    a: CodeAssembler,
    check_page: CodeLabel,
    write_page: CodeLabel,
    sum: CodeLabel,
    report: CodeLabel,
    mix64: CodeLabel,
    share: CodeLabel,
    fsck: CodeLabel,
    op_done: CodeLabel,
    /// The stream's loop with its window in the locals (`stream` and `mixed` enter there).
    play: CodeLabel,
    /// Each workload's entry.
    entries: Vec<(Workload, CodeLabel)>,
}

impl Gen {
    /// `dst = guest-physical address of page src` (dst != src).
    fn gpa(&mut self, dst: AsmRegister64, src: AsmRegister64) -> R {
        let a = &mut self.a;
        let mut low = a.create_label();
        let mut done = a.create_label();
        a.mov(dst, src)?;
        a.cmp(src, qword_ptr(r15 + Params::LOW_PAGES))?;
        a.jb(low)?;
        a.sub(dst, qword_ptr(r15 + Params::LOW_PAGES))?;
        a.shl(dst, 12)?;
        a.add(dst, qword_ptr(r15 + Params::HIGH_BASE))?;
        a.jmp(done)?;
        a.set_label(&mut low)?;
        a.shl(dst, 12)?;
        a.set_label(&mut done)?;
        Ok(())
    }

    /// Jumps to `fsck` when the host asked to stop.
    fn stop_check(&mut self) -> R {
        let fsck = self.fsck;
        self.a.cmp(qword_ptr(r14 + mb::STOP), 0)?;
        self.a.jne(fsck)
    }

    /// `out EVENT_PORT, ev`.
    fn event(&mut self, ev: Event) -> R {
        self.a.mov(al, ev as u32)?;
        self.a.mov(edx, u32::from(EVENT_PORT))?;
        self.a.out(dx, al)
    }

    /// xorshift64 step of `rbx` (clobbers rax).
    fn xorshift(&mut self) -> R {
        let a = &mut self.a;
        for (left, n) in [(true, 13), (false, 7), (true, 17)] {
            a.mov(rax, rbx)?;
            if left {
                a.shl(rax, n)?;
            } else {
                a.shr(rax, n)?;
            }
            a.xor(rbx, rax)?;
        }
        Ok(())
    }

    /// Jumps to `not_owner` unless `page % vcpus == r13` (clobbers rax, rdx).
    fn owned(&mut self, page: AsmRegister64, not_owner: CodeLabel) -> R {
        let a = &mut self.a;
        a.mov(rax, page)?;
        a.xor(edx, edx)?;
        a.div(qword_ptr(r15 + Params::VCPUS))?;
        a.cmp(rdx, r13)?;
        a.jne(not_owner)
    }

    /// `rax = page_sum(page at rsi)`; clobbers rcx, rdx, r11.
    fn emit_sum(&mut self) -> R {
        let a = &mut self.a;
        a.set_label(&mut self.sum)?;
        a.mov(rax, SUM_SEED)?;
        a.mov(rcx, SUM_MUL)?;
        a.lea(rdx, qword_ptr(rsi + 8))?;
        a.lea(r11, qword_ptr(rsi + 4096))?;
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.xor(rax, qword_ptr(rdx))?;
        a.imul_2(rax, rcx)?;
        a.rol(rax, SUM_ROT)?;
        a.add(rdx, 8)?;
        a.cmp(rdx, r11)?;
        a.jne(l)?;
        a.ret()
    }

    /// Records a failure: kind `edx`, page `r8`, found words `rcx`, `r11`, generation `r10`
    /// (clobbers rax).
    fn emit_report(&mut self) -> R {
        let a = &mut self.a;
        a.set_label(&mut self.report)?;
        let mut counted = a.create_label();
        a.mov(rax, qword_ptr(r14 + mb::ERRORS))?;
        a.test(rax, rax)?;
        a.jnz(counted)?;
        a.mov(qword_ptr(r14 + mb::ERR_KIND), rdx)?;
        a.mov(qword_ptr(r14 + mb::ERR_PAGE), r8)?;
        a.mov(qword_ptr(r14 + mb::ERR_W1), rcx)?;
        a.mov(qword_ptr(r14 + mb::ERR_W2), r11)?;
        a.mov(qword_ptr(r14 + mb::ERR_GEN), r10)?;
        a.set_label(&mut counted)?;
        a.inc(qword_ptr(r14 + mb::ERRORS))?;
        a.ret()
    }

    fn emit_check_page(&mut self) -> R {
        let (sum, report) = (self.sum, self.report);
        self.a.set_label(&mut self.check_page)?;
        let mut retry = self.a.create_label();
        let mut stable = self.a.create_label();
        let mut signed = self.a.create_label();
        let mut zl = self.a.create_label();
        let mut ok = self.a.create_label();
        let mut err = self.a.create_label();
        let mut not_lost = self.a.create_label();
        let mut pfn_ok = self.a.create_label();
        let mut gen_ok = self.a.create_label();
        {
            let a = &mut self.a;
            a.mov(r8, rdi)?;
            a.lea(r9, qword_ptr(r12 + r8 * 4))?;
            a.set_label(&mut retry)?;
            // Seqlock read side: the entry (r10), then the page, then the entry again.
            a.mov(r10d, dword_ptr(r9))?;
            a.test(r10d, 1)?;
            a.jz(stable)?;
            a.pause()?;
            a.jmp(retry)?;
            a.set_label(&mut stable)?;
        }
        self.gpa(rsi, r8)?;
        let a = &mut self.a;
        a.test(r10d, r10d)?;
        a.jnz(signed)?;
        // Generation 0: every word must be zero.
        a.xor(eax, eax)?;
        a.mov(rcx, rsi)?;
        a.lea(rdx, qword_ptr(rsi + 4096))?;
        a.set_label(&mut zl)?;
        a.or(rax, qword_ptr(rcx))?;
        a.add(rcx, 8)?;
        a.cmp(rcx, rdx)?;
        a.jne(zl)?;
        a.mov(r11d, dword_ptr(r9))?;
        a.cmp(r11d, r10d)?;
        a.jne(retry)?;
        a.test(rax, rax)?;
        a.jz(ok)?;
        a.mov(rcx, qword_ptr(rsi + 8))?;
        a.mov(r11, qword_ptr(rsi + 16))?;
        a.mov(edx, PageFault::NotZero as u32)?;
        a.jmp(err)?;
        // A signed page: sum, then words 0..3, then the entry again.
        a.set_label(&mut signed)?;
        a.call(sum)?;
        a.mov(rdx, qword_ptr(rsi))?;
        a.mov(rcx, qword_ptr(rsi + 8))?;
        a.mov(r11, qword_ptr(rsi + 16))?;
        a.mov(edi, dword_ptr(r9))?;
        a.cmp(edi, r10d)?;
        a.jne(retry)?;
        a.test(rcx, rcx)?;
        a.jnz(not_lost)?;
        a.test(r11, r11)?;
        a.jnz(not_lost)?;
        a.mov(edx, PageFault::Lost as u32)?;
        a.jmp(err)?;
        a.set_label(&mut not_lost)?;
        a.mov(rdi, rsi)?;
        a.shr(rdi, 12)?;
        a.cmp(rcx, rdi)?;
        a.je(pfn_ok)?;
        a.mov(edx, PageFault::Misplaced as u32)?;
        a.jmp(err)?;
        a.set_label(&mut pfn_ok)?;
        a.mov(rdi, PAGE_TAG)?;
        a.or(rdi, r10)?;
        a.cmp(r11, rdi)?;
        a.je(gen_ok)?;
        a.mov(edx, PageFault::Stale as u32)?;
        a.jmp(err)?;
        a.set_label(&mut gen_ok)?;
        a.cmp(rdx, rax)?;
        a.je(ok)?;
        a.mov(edx, PageFault::Corrupt as u32)?;
        a.set_label(&mut err)?;
        a.call(report)?;
        a.set_label(&mut ok)?;
        a.ret()
    }

    fn emit_write_page(&mut self) -> R {
        let sum = self.sum;
        self.a.set_label(&mut self.write_page)?;
        {
            let a = &mut self.a;
            a.mov(r8, rdi)?;
            a.lea(r9, qword_ptr(r12 + r8 * 4))?;
            // Seqlock write side (one writer per page): odd, rewrite, even and two higher.
            // x86 keeps stores in program order, so a reader that sees any new word also
            // sees the odd entry.
            a.mov(r10d, dword_ptr(r9))?;
            a.lea(eax, dword_ptr(r10 + 1))?;
            a.mov(dword_ptr(r9), eax)?;
        }
        self.gpa(rsi, r8)?;
        let a = &mut self.a;
        a.mov(rdi, rsi)?;
        a.shr(rdi, 12)?;
        a.mov(qword_ptr(rsi + 8), rdi)?;
        a.lea(eax, dword_ptr(r10 + 2))?;
        a.mov(rdi, PAGE_TAG)?;
        a.or(rdi, rax)?;
        a.mov(qword_ptr(rsi + 16), rdi)?;
        a.call(sum)?;
        a.mov(qword_ptr(rsi), rax)?;
        a.lea(eax, dword_ptr(r10 + 2))?;
        a.mov(dword_ptr(r9), eax)?;
        a.inc(qword_ptr(r14 + mb::WRITES))?;
        a.ret()
    }

    /// `rax = mix64(rax)`; clobbers rcx.
    fn emit_mix64(&mut self) -> R {
        let a = &mut self.a;
        a.set_label(&mut self.mix64)?;
        for (shift, mul) in [(30, 0xbf58_476d_1ce4_e5b9u64), (27, 0x94d0_49bb_1331_11eb)] {
            a.mov(rcx, rax)?;
            a.shr(rcx, shift)?;
            a.xor(rax, rcx)?;
            a.mov(rcx, mul)?;
            a.imul_2(rax, rcx)?;
        }
        a.mov(rcx, rax)?;
        a.shr(rcx, 31)?;
        a.xor(rax, rcx)?;
        a.ret()
    }

    /// `[rax, rcx)` becomes this vCPU's share of it (clobbers rdx, r8, r9, r10).
    fn emit_share(&mut self) -> R {
        let a = &mut self.a;
        a.set_label(&mut self.share)?;
        let mut done = a.create_label();
        a.mov(r8, rcx)?;
        a.mov(r9, rax)?;
        a.sub(rcx, rax)?;
        a.mov(rax, rcx)?;
        a.xor(edx, edx)?;
        a.div(qword_ptr(r15 + Params::VCPUS))?;
        a.mov(r10, rax)?;
        a.imul_2(rax, r13)?;
        a.add(rax, r9)?;
        a.lea(rcx, qword_ptr(rax + r10))?;
        a.mov(rdx, qword_ptr(r15 + Params::VCPUS))?;
        a.dec(rdx)?;
        a.cmp(r13, rdx)?;
        a.jne(done)?;
        a.mov(rcx, r8)?;
        a.set_label(&mut done)?;
        a.ret()
    }

    fn emit_fsck(&mut self) -> R {
        let (share, check) = (self.share, self.check_page);
        self.a.set_label(&mut self.fsck)?;
        let mut l = self.a.create_label();
        let mut done = self.a.create_label();
        let mut again = self.a.create_label();
        {
            let a = &mut self.a;
            a.mov(qword_ptr(r14 + mb::STATE), mb::VERIFYING as i32)?;
            a.mov(rax, qword_ptr(r15 + Params::DATA))?;
            a.mov(rcx, qword_ptr(r15 + Params::DATA + 8))?;
            a.call(share)?;
            a.mov(rbp, rax)?;
            a.mov(rbx, rcx)?;
            a.set_label(&mut l)?;
            a.cmp(rbp, rbx)?;
            a.jae(done)?;
            a.mov(rdi, rbp)?;
            a.call(check)?;
            a.inc(qword_ptr(r14 + mb::VERIFIED))?;
            a.inc(rbp)?;
            a.jmp(l)?;
            a.set_label(&mut done)?;
            a.mov(qword_ptr(r14 + mb::STATE), mb::DONE as i32)?;
            a.set_label(&mut again)?;
        }
        self.event(Event::Done)?;
        self.a.jmp(again)
    }

    /// `op_done`: one operation completed (see the module docs); clobbers nothing. Until
    /// `STAMPED`, it reads the clock: the first operation's time, then, with a window, the
    /// first operation at or after `WINDOW_END` records how many came before it.
    fn emit_op_done(&mut self) -> R {
        let a = &mut self.a;
        let mut stamp = a.create_label();
        let mut have_first = a.create_label();
        let mut finished = a.create_label();
        let mut out = a.create_label();
        a.set_label(&mut self.op_done)?;
        a.inc(qword_ptr(r14 + mb::OPS))?;
        a.cmp(qword_ptr(r14 + mb::STAMPED), 0)?;
        a.je(stamp)?;
        a.ret()?;
        a.set_label(&mut stamp)?;
        a.push(rax)?;
        a.push(rdx)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.add(rax, qword_ptr(r14 + mb::CLOCK_OFFSET))?;
        a.cmp(qword_ptr(r14 + mb::FIRST_OP_CLOCK), 0)?;
        a.jne(have_first)?;
        a.mov(qword_ptr(r14 + mb::FIRST_OP_CLOCK), rax)?;
        a.set_label(&mut have_first)?;
        a.mov(rdx, qword_ptr(r14 + mb::WINDOW_END))?;
        a.test(rdx, rdx)?;
        a.jz(finished)?;
        a.cmp(rax, rdx)?;
        a.jb(out)?;
        // The first operation at or after the window's end: the ones before it were inside.
        a.mov(rax, qword_ptr(r14 + mb::OPS))?;
        a.dec(rax)?;
        a.mov(qword_ptr(r14 + mb::WINDOW_OPS), rax)?;
        a.set_label(&mut finished)?;
        a.mov(qword_ptr(r14 + mb::STAMPED), 1)?;
        a.set_label(&mut out)?;
        a.pop(rdx)?;
        a.pop(rax)?;
        a.ret()
    }

    /// `rax = kv_key(seed, rax)` (clobbers rcx, rdx).
    fn kv_key(&mut self) -> R {
        let mix64 = self.mix64;
        let a = &mut self.a;
        let mut have = a.create_label();
        a.mov(rcx, 0x9e37_79b9_7f4a_7c15u64)?;
        a.imul_2(rax, rcx)?;
        a.xor(rax, qword_ptr(r15 + Params::SEED))?;
        a.mov(rcx, 0x6b65_795f_7365_6564u64)?;
        a.xor(rax, rcx)?;
        a.call(mix64)?;
        a.test(rax, rax)?;
        a.jnz(have)?;
        a.mov(eax, 1)?;
        a.set_label(&mut have)?;
        Ok(())
    }

    /// The image a booted guest builds itself ([`Params::init`]), exactly what
    /// [`Template`](crate::guest::image::Template) builds on the host: signed data pages (one
    /// in eight zero: written with zeros, since firmware leaves data in RAM), the generation
    /// table, the hash table. vCPU 0 builds it; the others wait. Keeps `rbx` and `rbp`.
    fn emit_init(&mut self, mut at: CodeLabel, done: CodeLabel) -> R {
        let (mix64, sum) = (self.mix64, self.sum);
        self.a.set_label(&mut at)?;
        let mut wait = self.a.create_label();
        let mut page = self.a.create_label();
        let mut not_kv = self.a.create_label();
        let mut next = self.a.create_label();
        let mut fill = self.a.create_label();
        let mut zero = self.a.create_label();
        let mut keys = self.a.create_label();
        let mut key = self.a.create_label();
        let mut probe = self.a.create_label();
        let mut store = self.a.create_label();
        let mut next_slot = self.a.create_label();
        let mut sign = self.a.create_label();
        let mut signed = self.a.create_label();
        let mut finished = self.a.create_label();
        {
            let a = &mut self.a;
            a.test(r13, r13)?;
            a.jnz(wait)?;
            a.push(rbx)?;
            a.push(rbp)?;
            a.sub(rsp, 24)?;
            // Data pages: a generation each, contents for the non-zero ones.
            a.mov(rbp, qword_ptr(r15 + Params::DATA))?;
            a.set_label(&mut page)?;
            a.cmp(rbp, qword_ptr(r15 + Params::DATA + 8))?;
            a.jae(keys)?;
            a.cmp(rbp, qword_ptr(r15 + Params::KV))?;
            a.jb(not_kv)?;
            a.cmp(rbp, qword_ptr(r15 + Params::KV + 8))?;
            a.jae(not_kv)?;
            a.mov(dword_ptr(r12 + rbp * 4), FIRST_GEN)?;
            a.jmp(next)?;
            a.set_label(&mut not_kv)?;
            // starts_zero: mix64(seed ^ "zero" ^ p * K) % 8 == 0
            a.mov(rax, 0xd6e8_feb8_6659_fd93u64)?;
            a.imul_2(rax, rbp)?;
            a.xor(rax, qword_ptr(r15 + Params::SEED))?;
            a.xor(rax, 0x7a65_726f)?;
            a.call(mix64)?;
            a.test(al, 7)?;
            a.jz(zero)?;
            // fill_random: xorshift64* from mix64(seed ^ p * K) | 1 over words 3..512
            a.mov(rax, 0x9e37_79b9_7f4a_7c15u64)?;
            a.imul_2(rax, rbp)?;
            a.xor(rax, qword_ptr(r15 + Params::SEED))?;
            a.call(mix64)?;
            a.or(rax, 1)?;
            a.mov(rbx, rax)?;
        }
        self.gpa(rsi, rbp)?;
        {
            let a = &mut self.a;
            a.lea(rdi, qword_ptr(rsi + 24))?;
            a.lea(r9, qword_ptr(rsi + 4096))?;
            a.mov(r8, 0x2545_f491_4f6c_dd1du64)?;
            a.set_label(&mut fill)?;
            for (left, n) in [(false, 12), (true, 25), (false, 27)] {
                a.mov(rax, rbx)?;
                if left {
                    a.shl(rax, n)?;
                } else {
                    a.shr(rax, n)?;
                }
                a.xor(rbx, rax)?;
            }
            a.mov(rax, rbx)?;
            a.imul_2(rax, r8)?;
            a.mov(qword_ptr(rdi), rax)?;
            a.add(rdi, 8)?;
            a.cmp(rdi, r9)?;
            a.jne(fill)?;
            a.mov(rax, rsi)?;
            a.shr(rax, 12)?;
            a.mov(qword_ptr(rsi + 8), rax)?;
            a.mov(rax, PAGE_TAG | u64::from(FIRST_GEN))?;
            a.mov(qword_ptr(rsi + 16), rax)?;
            a.call(sum)?;
            a.mov(qword_ptr(rsi), rax)?;
            a.mov(dword_ptr(r12 + rbp * 4), FIRST_GEN)?;
            a.jmp(next)?;
            // A zero page: written with zeros, whatever the firmware left there.
            a.set_label(&mut zero)?;
        }
        self.gpa(rsi, rbp)?;
        {
            let a = &mut self.a;
            a.xor(eax, eax)?;
            a.mov(rdi, rsi)?;
            a.mov(ecx, 512)?;
            a.rep().stosq()?;
            a.mov(dword_ptr(r12 + rbp * 4), 0)?;
            a.set_label(&mut next)?;
            a.inc(rbp)?;
            a.jmp(page)?;
            // The hash table: key i at its home slot or the next free one.
            a.set_label(&mut keys)?;
            a.xor(ebp, ebp)?;
            a.set_label(&mut key)?;
            a.cmp(rbp, qword_ptr(r15 + Params::KV_KEYS))?;
            a.jae(sign)?;
            a.mov(rax, rbp)?;
        }
        self.kv_key()?;
        {
            let a = &mut self.a;
            a.mov(rbx, rax)?;
            a.xor(rax, 0x686f_6d65)?;
            a.call(mix64)?;
            a.mul(qword_ptr(r15 + Params::KV_SLOTS))?;
            a.mov(qword_ptr(rsp), rdx)?;
            a.set_label(&mut probe)?;
            a.mov(rax, qword_ptr(rsp))?;
            a.xor(edx, edx)?;
            a.mov(ecx, SLOTS_PER_PAGE as u32)?;
            a.div(rcx)?;
            a.add(rax, qword_ptr(r15 + Params::KV))?;
            a.shl(rdx, 4)?;
            a.add(rdx, SLOT_BASE as i32)?;
            a.mov(qword_ptr(rsp + 8), rdx)?;
        }
        self.gpa(rsi, rax)?;
        {
            let a = &mut self.a;
            a.add(rsi, qword_ptr(rsp + 8))?;
            a.mov(rax, qword_ptr(rsi))?;
            a.test(rax, rax)?;
            a.jz(store)?;
            a.cmp(rax, rbx)?;
            a.je(store)?;
            a.mov(rax, qword_ptr(rsp))?;
            a.inc(rax)?;
            a.cmp(rax, qword_ptr(r15 + Params::KV_SLOTS))?;
            a.jb(next_slot)?;
            a.xor(eax, eax)?;
            a.set_label(&mut next_slot)?;
            a.mov(qword_ptr(rsp), rax)?;
            a.jmp(probe)?;
            a.set_label(&mut store)?;
            a.mov(qword_ptr(rsi), rbx)?;
            a.mov(qword_ptr(rsp + 16), rsi)?;
            a.mov(rax, rbx)?;
            a.mov(rcx, 0x7661_6c75_6500_0000u64)?;
            a.xor(rax, rcx)?;
            a.call(mix64)?;
            a.mov(rsi, qword_ptr(rsp + 16))?;
            a.mov(qword_ptr(rsi + 8), rax)?;
            a.inc(rbp)?;
            a.jmp(key)?;
            // Then sign every page of the table.
            a.set_label(&mut sign)?;
            a.mov(rbp, qword_ptr(r15 + Params::KV))?;
            a.set_label(&mut signed)?;
            a.cmp(rbp, qword_ptr(r15 + Params::KV + 8))?;
            a.jae(finished)?;
        }
        self.gpa(rsi, rbp)?;
        {
            let a = &mut self.a;
            a.mov(rax, rsi)?;
            a.shr(rax, 12)?;
            a.mov(qword_ptr(rsi + 8), rax)?;
            a.mov(rax, PAGE_TAG | u64::from(FIRST_GEN))?;
            a.mov(qword_ptr(rsi + 16), rax)?;
            a.call(sum)?;
            a.mov(qword_ptr(rsi), rax)?;
            a.inc(rbp)?;
            a.jmp(signed)?;
            a.set_label(&mut finished)?;
            a.add(rsp, 24)?;
            a.pop(rbp)?;
            a.pop(rbx)?;
            a.mov(qword_ptr(r15 + Params::INIT), 2)?;
            a.jmp(done)?;
            // Other vCPUs wait for vCPU 0.
            a.set_label(&mut wait)?;
            a.cmp(qword_ptr(r15 + Params::INIT), 1)?;
            a.jne(done)?;
            a.pause()?;
            a.jmp(wait)
        }
    }

    fn emit_seq(&mut self, mut at: CodeLabel) -> R {
        let (check, write, op_done) = (self.check_page, self.write_page, self.op_done);
        self.a.set_label(&mut at)?;
        let mut lp = self.a.create_label();
        let mut next = self.a.create_label();
        {
            let a = &mut self.a;
            // This vCPU's own window (one vCPU: the seq window).
            a.mov(rax, r13)?;
            a.shl(rax, 4)?;
            a.mov(rcx, qword_ptr(r15 + rax + Params::SEQ_WINDOWS + 8))?;
            a.mov(rax, qword_ptr(r15 + rax + Params::SEQ_WINDOWS))?;
            a.mov(qword_ptr(rsp), rax)?;
            a.mov(qword_ptr(rsp + 8), rcx)?;
            a.mov(rbp, rax)?;
            a.set_label(&mut lp)?;
        }
        self.stop_check()?;
        let a = &mut self.a;
        a.mov(rdi, rbp)?;
        a.call(check)?;
        a.call(op_done)?;
        a.test(bpl, 7)?;
        a.jnz(next)?;
        a.mov(rdi, rbp)?;
        a.call(write)?;
        a.set_label(&mut next)?;
        a.inc(rbp)?;
        a.cmp(rbp, qword_ptr(rsp + 8))?;
        a.jb(lp)?;
        a.mov(rbp, qword_ptr(rsp))?;
        a.jmp(lp)
    }

    fn emit_random(&mut self, mut at: CodeLabel) -> R {
        let (check, write, op_done) = (self.check_page, self.write_page, self.op_done);
        self.a.set_label(&mut at)?;
        let lp = at;
        self.stop_check()?;
        self.xorshift()?;
        {
            let a = &mut self.a;
            a.mov(rcx, qword_ptr(r15 + Params::DATA + 8))?;
            a.sub(rcx, qword_ptr(r15 + Params::DATA))?;
            a.mov(rax, rbx)?;
            a.mul(rcx)?;
            a.add(rdx, qword_ptr(r15 + Params::DATA))?;
            a.mov(rbp, rdx)?;
            a.mov(rdi, rbp)?;
            a.call(check)?;
            a.call(op_done)?;
            // A quarter of the reads write, if this vCPU owns the page (low bits of the
            // state: independent of the page, which came from the high bits).
            a.test(bl, 3)?;
            a.jnz(lp)?;
        }
        self.owned(rbp, lp)?;
        self.a.mov(rdi, rbp)?;
        self.a.call(write)?;
        self.a.jmp(lp)
    }

    fn emit_stream(&mut self, mut at: CodeLabel) -> R {
        let (check, write, fsck, op_done) =
            (self.check_page, self.write_page, self.fsck, self.op_done);
        self.a.set_label(&mut at)?;
        let mut frame = self.a.create_label();
        let mut read = self.a.create_label();
        let mut page = self.a.create_label();
        let mut no_write = self.a.create_label();
        let mut on_time = self.a.create_label();
        let mut set_to = self.a.create_label();
        let mut advance = self.a.create_label();
        let mut clear = self.a.create_label();
        let mut stop = self.a.create_label();
        let mut end_ok = self.a.create_label();
        // Locals: [rsp] due, [rsp+8] pause start (0: none), [rsp+16] pause end, [rsp+24] the
        // frame's end page, [rsp+32] and [rsp+40] the window played. Times are the program's
        // clock: rdtsc + CLOCK_OFFSET.
        {
            let a = &mut self.a;
            // This vCPU's own window (one vCPU: the stream window); `mixed` enters at `play`
            // with the window set.
            a.mov(rax, r13)?;
            a.shl(rax, 4)?;
            a.mov(rcx, qword_ptr(r15 + rax + Params::STREAM_WINDOWS))?;
            a.mov(qword_ptr(rsp + 32), rcx)?;
            a.mov(rcx, qword_ptr(r15 + rax + Params::STREAM_WINDOWS + 8))?;
            a.mov(qword_ptr(rsp + 40), rcx)?;
            a.set_label(&mut self.play)?;
            a.mov(rbp, qword_ptr(rsp + 32))?;
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.add(rax, qword_ptr(r14 + mb::CLOCK_OFFSET))?;
            a.mov(qword_ptr(rsp), rax)?;
            a.mov(qword_ptr(rsp + 8), 0)?;
            a.set_label(&mut frame)?;
            a.cmp(qword_ptr(r14 + mb::STOP), 0)?;
            a.jne(stop)?;
            // Ahead of schedule: sleep until due (the host sleeps; TSC ticks in SLEEP_TSC).
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.add(rax, qword_ptr(r14 + mb::CLOCK_OFFSET))?;
            a.mov(rcx, qword_ptr(rsp))?;
            a.cmp(rax, rcx)?;
            a.jae(read)?;
            a.sub(rcx, rax)?;
            a.mov(qword_ptr(r14 + mb::SLEEP_TSC), rcx)?;
        }
        self.event(Event::Sleep)?;
        {
            // Then wait out what is left (all of it where no host sleeps for the guest: a
            // booted guest's `out` goes nowhere), stopping when asked to; far from due (the
            // host sleeps at most a second at a time, and a stop cuts its sleep short), ask
            // for another sleep instead of spinning.
            let a = &mut self.a;
            let mut spin = a.create_label();
            a.set_label(&mut spin)?;
            a.cmp(qword_ptr(r14 + mb::STOP), 0)?;
            a.jne(stop)?;
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.add(rax, qword_ptr(r14 + mb::CLOCK_OFFSET))?;
            a.mov(rcx, qword_ptr(rsp))?;
            a.cmp(rax, rcx)?;
            a.jae(read)?;
            a.sub(rcx, rax)?;
            a.cmp(rcx, RESLEEP_TSC)?;
            a.ja(frame)?;
            a.pause()?;
            a.jmp(spin)?;
            a.set_label(&mut read)?;
            a.mov(rax, qword_ptr(r15 + Params::FRAME_PAGES))?;
            a.add(rax, rbp)?;
            a.mov(rcx, qword_ptr(rsp + 40))?;
            a.cmp(rax, rcx)?;
            a.cmova(rax, rcx)?;
            a.mov(qword_ptr(rsp + 24), rax)?;
            a.mov(rbx, rbp)?;
            a.set_label(&mut page)?;
            a.mov(rdi, rbx)?;
            a.call(check)?;
            a.call(op_done)?;
            a.cmp(rbx, rbp)?;
            a.jne(no_write)?;
            a.mov(rdi, rbx)?;
            a.call(write)?;
            a.set_label(&mut no_write)?;
            a.inc(rbx)?;
            a.cmp(rbx, qword_ptr(rsp + 24))?;
            a.jb(page)?;
            // The frame is done: late if it ended more than one interval after it was due.
            a.inc(qword_ptr(r14 + mb::FRAMES))?;
            a.rdtsc()?;
            a.shl(rdx, 32)?;
            a.or(rax, rdx)?;
            a.add(rax, qword_ptr(r14 + mb::CLOCK_OFFSET))?;
            a.mov(rcx, qword_ptr(rsp))?;
            a.add(rcx, qword_ptr(r14 + mb::FRAME_TSC))?;
            a.cmp(rax, rcx)?;
            a.jbe(on_time)?;
            a.inc(qword_ptr(r14 + mb::LATE_FRAMES))?;
            a.cmp(qword_ptr(rsp + 8), 0)?;
            a.jne(set_to)?;
            a.mov(rcx, qword_ptr(rsp))?;
            a.mov(qword_ptr(rsp + 8), rcx)?;
            a.set_label(&mut set_to)?;
            a.mov(qword_ptr(rsp + 16), rax)?;
            a.jmp(advance)?;
            // On time: a pause in progress ends; keep the longest.
            a.set_label(&mut on_time)?;
            a.mov(rcx, qword_ptr(rsp + 8))?;
            a.test(rcx, rcx)?;
            a.jz(advance)?;
            a.mov(rax, qword_ptr(rsp + 16))?;
            a.sub(rax, rcx)?;
            a.cmp(rax, qword_ptr(r14 + mb::LONGEST_PAUSE))?;
            a.jbe(clear)?;
            a.mov(qword_ptr(r14 + mb::LONGEST_PAUSE), rax)?;
            a.set_label(&mut clear)?;
            a.mov(qword_ptr(rsp + 8), 0)?;
            a.set_label(&mut advance)?;
            a.mov(rax, qword_ptr(r14 + mb::FRAME_TSC))?;
            a.add(qword_ptr(rsp), rax)?;
            a.mov(rbp, qword_ptr(rsp + 24))?;
            a.cmp(rbp, qword_ptr(rsp + 40))?;
            a.jb(frame)?;
            a.mov(rbp, qword_ptr(rsp + 32))?;
            a.jmp(frame)?;
            // Stopped: a pause still in progress counts too.
            a.set_label(&mut stop)?;
            a.mov(rcx, qword_ptr(rsp + 8))?;
            a.test(rcx, rcx)?;
            a.jz(end_ok)?;
            a.mov(rax, qword_ptr(rsp + 16))?;
            a.sub(rax, rcx)?;
            a.cmp(rax, qword_ptr(r14 + mb::LONGEST_PAUSE))?;
            a.jbe(end_ok)?;
            a.mov(qword_ptr(r14 + mb::LONGEST_PAUSE), rax)?;
            a.set_label(&mut end_ok)?;
            a.jmp(fsck)
        }
    }

    /// `mixed`: vCPU 0 plays the stream window (the one-vCPU one), the others run `kv`.
    fn emit_mixed(&mut self, mut at: CodeLabel) -> R {
        let (play, kv) = (self.play, self.entry(Workload::Kv));
        let a = &mut self.a;
        a.set_label(&mut at)?;
        a.test(r13, r13)?;
        a.jnz(kv)?;
        a.mov(rcx, qword_ptr(r15 + Params::STREAM))?;
        a.mov(qword_ptr(rsp + 32), rcx)?;
        a.mov(rcx, qword_ptr(r15 + Params::STREAM + 8))?;
        a.mov(qword_ptr(rsp + 40), rcx)?;
        a.jmp(play)
    }

    /// The entry of workload `w`'s loop.
    fn entry(&self, w: Workload) -> CodeLabel {
        self.entries
            .iter()
            .find(|(x, _)| *x == w)
            .map(|&(_, l)| l)
            .expect("every workload has an entry")
    }

    fn emit_kv(&mut self, mut at: CodeLabel) -> R {
        let (check, write, mix64, report, op_done) = (
            self.check_page,
            self.write_page,
            self.mix64,
            self.report,
            self.op_done,
        );
        self.a.set_label(&mut at)?;
        let lp = at;
        let mut probe = self.a.create_label();
        let mut good = self.a.create_label();
        let mut miss = self.a.create_label();
        let mut missing = self.a.create_label();
        let mut wrapped = self.a.create_label();
        // Locals: [rsp] slot, [rsp+8] probes, [rsp+16] page, [rsp+24] offset, [rsp+32] value.
        self.stop_check()?;
        self.xorshift()?;
        {
            let a = &mut self.a;
            // key = max(mix64(seed ^ C ^ i * K), 1), i = (rbx * keys) >> 64
            a.mov(rax, rbx)?;
            a.mul(qword_ptr(r15 + Params::KV_KEYS))?;
            a.mov(rax, rdx)?;
        }
        self.kv_key()?;
        {
            let a = &mut self.a;
            a.mov(rbp, rax)?;
            // slot = (mix64(key ^ "home") * slots) >> 64
            a.xor(rax, 0x686f_6d65)?;
            a.call(mix64)?;
            a.mul(qword_ptr(r15 + Params::KV_SLOTS))?;
            a.mov(qword_ptr(rsp), rdx)?;
            a.mov(qword_ptr(rsp + 8), 0)?;
            a.set_label(&mut probe)?;
            a.mov(rax, qword_ptr(rsp))?;
            a.xor(edx, edx)?;
            a.mov(ecx, SLOTS_PER_PAGE as u32)?;
            a.div(rcx)?;
            a.add(rax, qword_ptr(r15 + Params::KV))?;
            a.mov(qword_ptr(rsp + 16), rax)?;
            a.shl(rdx, 4)?;
            a.add(rdx, SLOT_BASE as i32)?;
            a.mov(qword_ptr(rsp + 24), rdx)?;
            a.mov(rdi, rax)?;
            a.call(check)?;
            a.mov(rax, qword_ptr(rsp + 16))?;
        }
        self.gpa(rsi, rax)?;
        {
            let a = &mut self.a;
            a.add(rsi, qword_ptr(rsp + 24))?;
            a.mov(rax, qword_ptr(rsi))?;
            a.mov(rcx, qword_ptr(rsi + 8))?;
            a.cmp(rax, rbp)?;
            a.jne(miss)?;
            // Found: the value must be kv_value(key).
            a.mov(qword_ptr(rsp + 32), rcx)?;
            a.mov(rax, rbp)?;
            a.mov(rcx, 0x7661_6c75_6500_0000u64)?;
            a.xor(rax, rcx)?;
            a.call(mix64)?;
            a.cmp(rax, qword_ptr(rsp + 32))?;
            a.je(good)?;
            a.mov(edx, PageFault::WrongValue as u32)?;
            a.mov(r8, qword_ptr(rsp + 16))?;
            a.mov(rcx, qword_ptr(rsp + 32))?;
            a.mov(r11, rbp)?;
            a.xor(r10d, r10d)?;
            a.call(report)?;
            a.set_label(&mut good)?;
            a.call(op_done)?;
            // An eighth of the lookups update (re-sign) the page, if this vCPU owns it.
            a.test(bl, 7)?;
            a.jnz(lp)?;
            a.mov(rdi, qword_ptr(rsp + 16))?;
        }
        self.owned(rdi, lp)?;
        {
            let a = &mut self.a;
            a.mov(rdi, qword_ptr(rsp + 16))?;
            a.call(write)?;
            a.jmp(lp)?;
            // Another key: probe on, unless the slot is empty or every slot was probed.
            a.set_label(&mut miss)?;
            a.test(rax, rax)?;
            a.jz(missing)?;
            a.inc(qword_ptr(rsp + 8))?;
            a.mov(rax, qword_ptr(rsp + 8))?;
            a.cmp(rax, qword_ptr(r15 + Params::KV_SLOTS))?;
            a.jae(missing)?;
            a.mov(rax, qword_ptr(rsp))?;
            a.inc(rax)?;
            a.cmp(rax, qword_ptr(r15 + Params::KV_SLOTS))?;
            a.jb(wrapped)?;
            a.xor(eax, eax)?;
            a.set_label(&mut wrapped)?;
            a.mov(qword_ptr(rsp), rax)?;
            a.jmp(probe)?;
            a.set_label(&mut missing)?;
            a.mov(edx, PageFault::MissingKey as u32)?;
            a.mov(r8, qword_ptr(rsp + 16))?;
            a.mov(rcx, rax)?;
            a.mov(r11, rbp)?;
            a.xor(r10d, r10d)?;
            a.call(report)?;
            a.call(op_done)?;
            a.jmp(lp)
        }
    }
}

impl Gen {
    /// Emits workload `w`'s loop at `at`: one arm per workload, so that a workload without
    /// an emitter does not compile (see [`crate::guest::workload`]).
    fn emit_workload(&mut self, w: Workload, at: CodeLabel) -> R {
        match w {
            Workload::Seq => self.emit_seq(at),
            Workload::Random => self.emit_random(at),
            Workload::Stream => self.emit_stream(at),
            Workload::Kv => self.emit_kv(at),
            Workload::Mixed => self.emit_mixed(at),
        }
    }
}

/// Assembles the guest program for [`CODE_GPA`]: the entry, a dispatch on the parameter
/// page's workload code to each workload's loop, and the routines they share.
pub fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let labels = [(); 9].map(|_| a.create_label());
    let [check_page, write_page, sum, report, mix64, share, fsck, op_done, play] = labels;
    let workloads: Vec<(Workload, CodeLabel)> = Workload::ALL
        .iter()
        .map(|&w| (w, a.create_label()))
        .collect();
    let mut g = Gen {
        a,
        check_page,
        write_page,
        sum,
        report,
        mix64,
        share,
        fsck,
        op_done,
        play,
        entries: workloads.clone(),
    };
    // Entry.
    {
        let a = &mut g.a;
        a.mov(r13, rdi)?;
        a.mov(r15, rsi)?;
        a.mov(r12, qword_ptr(r15 + Params::GENTAB))?;
        a.mov(r14, rdi)?;
        a.shl(r14, 12)?;
        a.add(r14, qword_ptr(r15 + Params::MAILBOX))?;
        a.sub(rsp, 64)?;
        a.mov(qword_ptr(r14 + mb::STATE), mb::RUNNING as i32)?;
    }
    let init = g.a.create_label();
    let mut run = g.a.create_label();
    {
        let a = &mut g.a;
        a.cmp(qword_ptr(r15 + Params::INIT), 0)?;
        a.jne(init)?;
        a.set_label(&mut run)?;
    }
    g.event(Event::Started)?;
    {
        let a = &mut g.a;
        a.mov(rax, qword_ptr(r15 + Params::WORKLOAD))?;
        for &(w, at) in &workloads {
            a.cmp(rax, w.code() as i32)?;
            a.je(at)?;
        }
        // A code no workload has (the host never writes one): stop, verify, report done.
        a.jmp(g.fsck)?;
    }
    g.emit_init(init, run)?;
    for (w, at) in workloads {
        g.emit_workload(w, at)?;
    }
    g.emit_fsck()?;
    g.emit_check_page()?;
    g.emit_write_page()?;
    g.emit_sum()?;
    g.emit_report()?;
    g.emit_mix64()?;
    g.emit_share()?;
    g.emit_op_done()?;
    let code = g.a.assemble(CODE_GPA)?;
    assert!((code.len() as u64) <= CODE_MAX, "guest program too large");
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_assembles_and_fits() {
        let code = assemble().unwrap();
        assert!(
            code.len() > 200 && code.len() as u64 <= CODE_MAX,
            "{}",
            code.len()
        );
        // Deterministic: the same bytes every time (part of the image of a layout and seed).
        assert_eq!(code, assemble().unwrap());
    }
}
