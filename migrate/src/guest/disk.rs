//! The same guest as a bootable raw disk image, for QEMU (or any PC firmware): a boot sector
//! that loads the rest, switches to protected mode and long mode, starts the other vCPUs, and
//! enters the very same program ([`super::kvm::program`]) at CPL 3 on every vCPU, which builds
//! its image itself (the firmware leaves RAM zeroed) and then runs the workload, exactly as in
//! the KVM harness.
//!
//! # Boot
//! 1. **Boot sector** (16-bit, at `0x7c00`, loaded by the BIOS): enables A20, loads the
//!    parameter page to [`PARAMS_GPA`] and the load region ([`LOAD_BASE`] .. [`LOAD_END`]:
//!    stage 2, the long-mode entries, the boot data, the application processors' start page,
//!    the program) with `int 13h` extended reads, loads a flat GDT and jumps to stage 2 in
//!    32-bit protected mode.
//! 2. **Stage 2** (32-bit, at [`STAGE2`]): builds identity page tables for the low 4 GiB in
//!    2 MiB pages (accessed and dirty preset, as [`super::kvm::boot`] builds them), enables
//!    PAE, long mode and paging, loads the 64-bit GDT and jumps to 64-bit code.
//! 3. **Long mode, the bootstrap processor** (at [`LONG_ENTRY`]): with several vCPUs, wakes
//!    the others through its local APIC (INIT, then two start-up IPIs to [`AP_START`], to all
//!    but itself), then enters the program as vCPU 0.
//! 4. **The application processors** start in real mode at [`AP_START`] (the start-up IPI's
//!    vector page), load a flat GDT of their own, enter protected mode, then long mode over
//!    the page tables stage 2 built (at [`AP_LONG`]), and take the next vCPU index with one
//!    `lock xadd` on the boot data's counter (one past the last vCPU: the processor halts, so
//!    that a machine with more processors than the image's vCPUs runs the image's count).
//! 5. **Every vCPU** (at [`ENTER`], index `i`): clears its status page ([`MAILBOX`] + `i` ×
//!    4 KiB), writes the stream's frame interval in it, and `iretq`s to the program at CPL 3
//!    with IOPL 3 and the registers of the program's ABI — as the KVM guest's vCPU `i` has
//!    them: `rdi = i`, `rsi =` the parameter page, `rbx` its seed (the boot data's table,
//!    [`super::kvm::boot::boot_regs`]'s), `rsp =` the top of its stack page.
//!
//! Differences from the KVM harness, all in the parameter page: RAM is one block below 4 GiB
//! (QEMU's `pc` machine; global pages map 1:1), the status pages are RAM (at [`MAILBOX`]; no
//! host reads them during the run, and nothing asks the program to stop), and `init` asks
//! vCPU 0 to build the image (the others wait for it, as the program does). At most
//! [`DISK_MAX_VCPUS`] vCPUs (their stacks and status pages lie below 512 KiB).

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use super::image::{mix64, Params};
use super::kvm::boot::boot_regs;
use super::kvm::boot::GDT;
use super::kvm::program::{self, mailbox};
use super::layout::{
    GuestLayout, CODE_GPA, PARAMS_GPA, PDPT_GPA, PD_GPA, PML4_GPA, STACKS_GPA, TARGET_PAGE,
};
use super::Workload;

/// Where the boot sector loads stage 2, the boot code and data, and the program.
pub const LOAD_BASE: u64 = 0x48000;
/// End of the load region (the program's end, [`CODE_GPA`] + 64 KiB).
pub const LOAD_END: u64 = 0x60000;
/// Stage 2 (32-bit).
pub const STAGE2: u64 = 0x4c000;
/// Stage 2's 64-bit part: the bootstrap processor in long mode.
pub const LONG_ENTRY: u64 = 0x4d000;
/// The application processors in long mode.
pub const AP_LONG: u64 = 0x4d200;
/// Every vCPU's way into the program (`rdi` = its index).
pub const ENTER: u64 = 0x4d400;
/// The 64-bit GDT and its descriptor.
pub const GDT64: u64 = 0x4d800;
/// The boot data: the stream's frame interval, the next application processor's vCPU
/// index, and each vCPU's `rbx` (little-endian `u64` words).
pub const BOOT_INFO: u64 = 0x4dc00;
/// Where the application processors start (real mode; the start-up IPI's vector is its page
/// number): their code, their flat GDT, and their 32-bit part.
pub const AP_START: u64 = 0x4e000;
/// vCPU 0's status page, in RAM; vCPU `i`'s is `i` pages further.
pub const MAILBOX: u64 = 0x70000;
/// Most vCPUs a booted guest has: their stacks ([`STACKS_GPA`]) and status pages end below
/// 512 KiB, in conventional memory no firmware keeps.
pub const DISK_MAX_VCPUS: u32 = 16;
// The start-up IPI's vector is a page below 1 MiB, in the load region; the stacks, then the
// status pages, end below 512 KiB.
const _: () = assert!(AP_START < 1 << 20 && AP_START & 0xfff == 0 && AP_START >= LOAD_BASE);
const _: () = assert!(STACKS_GPA + DISK_MAX_VCPUS as u64 * 4096 <= MAILBOX);
const _: () = assert!(MAILBOX + DISK_MAX_VCPUS as u64 * 4096 <= 0x80000);

/// The local APIC's interrupt command register (low), xAPIC mode.
const APIC_ICR_LOW: u64 = 0xfee0_0300;
/// The local APIC's spurious-interrupt vector register (bit 8: the APIC is on).
const APIC_SVR: u64 = 0xfee0_00f0;
/// ICR: INIT, level assert, to all but the sender.
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
/// ICR: start-up, to all but the sender (the vector is OR-ed in).
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600;
/// ICR: delivery still pending.
const ICR_PENDING: u32 = 1 << 12;
/// Where the boot sector keeps its data (drive number, GDT, disk address packets).
const BOOT_DATA: u16 = 0x7d00;
const SECTOR: u64 = 512;
/// 2 MiB page directories: the low 4 GiB.
const PDS: u64 = 4;

/// What the disk image contains, apart from the code.
#[derive(Clone, Debug)]
pub struct DiskSpec {
    /// The guest's layout (its RAM size, windows and vCPUs; RAM is taken as one block).
    pub layout: GuestLayout,
    /// What the guest runs.
    pub workload: Workload,
    /// Image and workload seed.
    pub seed: u64,
    /// The stream's frame interval in TSC ticks (the status page's `FRAME_TSC`).
    pub frame_tsc: u64,
}

/// The parameter page of a booted guest.
pub fn params(spec: &DiskSpec) -> Params {
    let l = &spec.layout;
    let mut p = Params::new(l, spec.workload, spec.seed, super::STREAM_FRAME_PAGES);
    p.low_pages = l.pages();
    p.mailbox = MAILBOX;
    p.init = 1;
    p.boot_rbx = mix64(spec.seed ^ 0x9e37_79b9_7f4a_7c15) | 1;
    debug_assert_eq!(p.boot_rbx, boot_regs(0, spec.seed).rbx);
    p
}

fn words(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn boot_sector(params_lba: u64, load_lba: u64) -> Result<[u8; 512], IcedError> {
    let drive = u64::from(BOOT_DATA);
    let gdt = drive + 8;
    let gdt_desc = gdt + 24;
    let daps = gdt_desc + 8;
    // Disk address packets: the parameter page, then the load region in 64-sector chunks.
    let mut packets: Vec<(u16, u16, u16, u64)> = vec![(8, 0x1000, 0, params_lba)];
    let mut lba = load_lba;
    let mut addr = LOAD_BASE;
    while addr < LOAD_END {
        let n = ((LOAD_END - addr) / SECTOR).min(64);
        packets.push((n as u16, 0, (addr >> 4) as u16, lba));
        lba += n;
        addr += n * SECTOR;
    }
    let mut a = CodeAssembler::new(16)?;
    let mut fail = a.create_label();
    a.cli()?;
    a.cld()?;
    a.xor(ax, ax)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(sp, 0x7c00u32)?;
    a.mov(byte_ptr(drive), dl)?;
    // A20 through the system control port.
    a.in_(al, 0x92)?;
    a.or(al, 2)?;
    a.and(al, 0xfe)?;
    a.out(0x92, al)?;
    for i in 0..packets.len() {
        a.mov(si, (daps + 16 * i as u64) as u32)?;
        a.mov(ah, 0x42)?;
        a.mov(dl, byte_ptr(drive))?;
        a.int(0x13)?;
        a.jc(fail)?;
    }
    a.lgdt(ptr(gdt_desc))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    // jmp dword 0x08:STAGE2 (32-bit offset from 16-bit code).
    let mut far = vec![0x66, 0xea];
    far.extend_from_slice(&(STAGE2 as u32).to_le_bytes());
    far.extend_from_slice(&8u16.to_le_bytes());
    a.db(&far)?;
    a.set_label(&mut fail)?;
    a.hlt()?;
    a.jmp(fail)?;
    let code = a.assemble(0x7c00)?;
    let mut s = [0u8; 512];
    assert!(
        code.len() <= usize::from(BOOT_DATA - 0x7c00),
        "boot sector code too long"
    );
    s[..code.len()].copy_from_slice(&code);
    let at = |addr: u64| (addr - 0x7c00) as usize;
    s[at(gdt)..at(gdt) + 24].copy_from_slice(&words(&[
        0,
        0x00cf_9a00_0000_ffff,
        0x00cf_9200_0000_ffff,
    ]));
    s[at(gdt_desc)..at(gdt_desc) + 2].copy_from_slice(&23u16.to_le_bytes());
    s[at(gdt_desc) + 2..at(gdt_desc) + 6].copy_from_slice(&(gdt as u32).to_le_bytes());
    for (i, (n, off, seg, lba)) in packets.iter().enumerate() {
        let p = at(daps) + 16 * i;
        s[p] = 16;
        s[p + 2..p + 4].copy_from_slice(&n.to_le_bytes());
        s[p + 4..p + 6].copy_from_slice(&off.to_le_bytes());
        s[p + 6..p + 8].copy_from_slice(&seg.to_le_bytes());
        s[p + 8..p + 16].copy_from_slice(&lba.to_le_bytes());
    }
    assert!(
        at(daps) + 16 * packets.len() <= 510,
        "boot sector data too long"
    );
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

fn stage2() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let mut zero = a.create_label();
    let mut pdpt = a.create_label();
    let mut pd = a.create_label();
    a.mov(ax, 0x10u32)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(fs, ax)?;
    a.mov(gs, ax)?;
    a.mov(esp, STAGE2 as u32)?;
    // Zero the tables.
    a.mov(edi, PML4_GPA as u32)?;
    a.mov(ecx, (PD_GPA + PDS * 4096) as u32)?;
    a.xor(eax, eax)?;
    a.set_label(&mut zero)?;
    a.mov(dword_ptr(edi), eax)?;
    a.add(edi, 4)?;
    a.cmp(edi, ecx)?;
    a.jb(zero)?;
    // PML4[0] -> PDPT; PDPT[i] -> PD i; PD entries: 2 MiB pages, accessed and dirty preset.
    let table = 0x27; // present, writable, user, accessed
    a.mov(dword_ptr(PML4_GPA as u32), (PDPT_GPA | table) as u32)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut pdpt)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 12)?;
    a.add(eax, (PD_GPA | table) as u32)?;
    a.mov(dword_ptr(ecx * 8 + PDPT_GPA as u32), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, PDS as u32)?;
    a.jb(pdpt)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut pd)?;
    a.mov(eax, ecx)?;
    a.shl(eax, 21)?;
    a.or(eax, 0xe7)?; // present, writable, user, accessed, dirty, 2 MiB
    a.mov(dword_ptr(ecx * 8 + PD_GPA as u32), eax)?;
    a.inc(ecx)?;
    a.cmp(ecx, (PDS * 512) as u32)?;
    a.jb(pd)?;
    // PAE, long mode, paging.
    a.mov(eax, cr4)?;
    a.or(eax, 0x20)?;
    a.mov(cr4, eax)?;
    a.mov(eax, PML4_GPA as u32)?;
    a.mov(cr3, eax)?;
    a.mov(ecx, 0xc000_0080u32)?;
    a.rdmsr()?;
    a.or(eax, 0x100)?;
    a.wrmsr()?;
    a.lgdt(ptr((GDT64 + 64) as u32))?;
    a.mov(eax, cr0)?;
    a.or(eax, 0x8000_0000u32)?;
    a.mov(cr0, eax)?;
    let mut far = vec![0xea];
    far.extend_from_slice(&(LONG_ENTRY as u32).to_le_bytes());
    far.extend_from_slice(&8u16.to_le_bytes());
    a.db(&far)?;
    a.assemble(STAGE2)
}

/// The bootstrap processor in long mode: wakes the other vCPUs (with several), then enters
/// the program as vCPU 0.
fn long_entry(vcpus: u32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(ax, 0x10u32)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    if vcpus > 1 {
        // The local APIC on (the firmware may have left it off), then INIT and two start-up
        // IPIs to every other processor, each sent once the previous one was delivered.
        a.mov(rdx, APIC_SVR)?;
        a.or(dword_ptr(rdx), 0x100)?;
        a.mov(rdx, APIC_ICR_LOW)?;
        let sipi = ICR_SIPI_ALL_BUT_SELF | (AP_START >> 12) as u32;
        for icr in [ICR_INIT_ALL_BUT_SELF, sipi, sipi] {
            a.mov(dword_ptr(rdx), icr)?;
            let mut pending = a.create_label();
            a.set_label(&mut pending)?;
            a.pause()?;
            a.test(dword_ptr(rdx), ICR_PENDING)?;
            a.jnz(pending)?;
            // A short wait between the IPIs, as the start-up protocol asks.
            let mut wait = a.create_label();
            a.mov(ecx, 100_000u32)?;
            a.set_label(&mut wait)?;
            a.pause()?;
            a.dec(ecx)?;
            a.jnz(wait)?;
        }
    }
    a.xor(edi, edi)?;
    a.mov(rax, ENTER)?;
    a.jmp(rax)?;
    a.assemble(LONG_ENTRY)
}

/// An application processor in long mode: takes the next vCPU index, or halts if the image
/// has no vCPU left for it.
fn ap_long() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut park = a.create_label();
    a.mov(ax, 0x10u32)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    a.mov(eax, 1u32)?;
    a.lock().xadd(dword_ptr(BOOT_INFO + 8), eax)?;
    a.mov(edi, eax)?;
    a.cmp(rdi, qword_ptr(PARAMS_GPA + Params::VCPUS as u64))?;
    a.jae(park)?;
    a.mov(rax, ENTER)?;
    a.jmp(rax)?;
    a.set_label(&mut park)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(park)?;
    a.assemble(AP_LONG)
}

/// Every vCPU (`rdi` = its index): its status page cleared with the frame interval in it,
/// then `iretq` to the program at CPL 3 with the ABI's registers.
fn enter() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    // rdx = the status page; clear it (rep stosq moves rdi: keep the index in r8).
    a.mov(r8, rdi)?;
    a.mov(rdx, rdi)?;
    a.shl(rdx, 12)?;
    a.add(rdx, MAILBOX as i32)?;
    a.mov(rdi, rdx)?;
    a.xor(eax, eax)?;
    a.mov(ecx, (TARGET_PAGE / 8) as u32)?;
    a.rep().stosq()?;
    a.mov(rax, qword_ptr(BOOT_INFO))?;
    a.mov(qword_ptr(rdx + mailbox::FRAME_TSC), rax)?;
    // rcx = the top of the vCPU's stack page, where the iretq frame goes too.
    a.lea(rcx, qword_ptr(r8 + 1))?;
    a.shl(rcx, 12)?;
    a.add(rcx, STACKS_GPA as i32)?;
    a.mov(rsp, rcx)?;
    // iretq to the program at CPL 3: ss, rsp, rflags (IOPL 3, interrupts off), cs, rip.
    a.push(0x23)?;
    a.push(rcx)?;
    a.push(0x3002)?;
    a.push(0x1b)?;
    a.push(CODE_GPA as i32)?;
    a.mov(rbx, qword_ptr(r8 * 8 + (BOOT_INFO + 16) as i32))?;
    a.mov(rdi, r8)?;
    a.mov(esi, PARAMS_GPA as u32)?;
    a.iretq()?;
    a.assemble(ENTER)
}

/// Offset in the [`AP_START`] page of the processors' flat GDT, its descriptor, and their
/// 32-bit code.
const AP_GDT: u64 = 0x100;
const AP_GDT_DESC: u64 = 0x120;
const AP_32: u64 = 0x200;

/// The [`AP_START`] page: 16-bit code (run at `AP_START >> 4 : 0`) that loads the page's
/// flat GDT and enters protected mode, the GDT, and the 32-bit code that enables PAE, long
/// mode and paging over stage 2's tables and jumps to [`AP_LONG`].
fn ap_start() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.cli()?;
    a.mov(ax, cs)?;
    a.mov(ds, ax)?;
    a.lgdt(ptr(AP_GDT_DESC))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    // jmp dword 0x08:AP_START + AP_32 (32-bit offset from 16-bit code).
    let mut far = vec![0x66, 0xea];
    far.extend_from_slice(&((AP_START + AP_32) as u32).to_le_bytes());
    far.extend_from_slice(&8u16.to_le_bytes());
    a.db(&far)?;
    let code16 = a.assemble(0)?;
    let mut b = CodeAssembler::new(32)?;
    b.mov(ax, 0x10u32)?;
    b.mov(ds, ax)?;
    b.mov(es, ax)?;
    b.mov(ss, ax)?;
    b.mov(eax, cr4)?;
    b.or(eax, 0x20)?;
    b.mov(cr4, eax)?;
    b.mov(eax, PML4_GPA as u32)?;
    b.mov(cr3, eax)?;
    b.mov(ecx, 0xc000_0080u32)?;
    b.rdmsr()?;
    b.or(eax, 0x100)?;
    b.wrmsr()?;
    b.lgdt(ptr((GDT64 + 64) as u32))?;
    b.mov(eax, cr0)?;
    b.or(eax, 0x8000_0000u32)?;
    b.mov(cr0, eax)?;
    let mut far = vec![0xea];
    far.extend_from_slice(&(AP_LONG as u32).to_le_bytes());
    far.extend_from_slice(&8u16.to_le_bytes());
    b.db(&far)?;
    let code32 = b.assemble(AP_START + AP_32)?;
    let mut page = vec![0u8; (AP_32 as usize) + code32.len()];
    assert!(code16.len() as u64 <= AP_GDT, "AP start code too long");
    page[..code16.len()].copy_from_slice(&code16);
    let gdt = words(&[0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff]);
    page[AP_GDT as usize..AP_GDT as usize + gdt.len()].copy_from_slice(&gdt);
    let d = AP_GDT_DESC as usize;
    page[d..d + 2].copy_from_slice(&23u16.to_le_bytes());
    page[d + 2..d + 6].copy_from_slice(&((AP_START + AP_GDT) as u32).to_le_bytes());
    page[AP_32 as usize..].copy_from_slice(&code32);
    Ok(page)
}

/// The raw disk image: the boot sector, the parameter page, the load region; padded to a
/// whole MiB.
pub fn image(spec: &DiskSpec) -> Result<Vec<u8>, String> {
    let asm = |e: IcedError| format!("assembling the boot code: {e}");
    let vcpus = spec.layout.vcpus();
    if vcpus > DISK_MAX_VCPUS {
        return Err(format!(
            "a booted guest has at most {DISK_MAX_VCPUS} vCPUs, not {vcpus} (their stacks and status pages lie below 512 KiB)"
        ));
    }
    let params_lba = 1;
    let load_lba = params_lba + TARGET_PAGE / SECTOR;
    let mut disk = boot_sector(params_lba, load_lba).map_err(asm)?.to_vec();
    let mut page = vec![0u8; TARGET_PAGE as usize];
    let p = words(&params(spec).encode());
    page[..p.len()].copy_from_slice(&p);
    disk.extend_from_slice(&page);
    let mut region = vec![0u8; (LOAD_END - LOAD_BASE) as usize];
    let mut put = |addr: u64, bytes: &[u8]| {
        let at = (addr - LOAD_BASE) as usize;
        region[at..at + bytes.len()].copy_from_slice(bytes);
    };
    put(STAGE2, &stage2().map_err(asm)?);
    let fits = |what: &str, code: Vec<u8>, room: u64| {
        if code.len() as u64 > room {
            Err(format!(
                "the {what} code is {} bytes, {room} at most",
                code.len()
            ))
        } else {
            Ok(code)
        }
    };
    let long = long_entry(vcpus).map_err(asm)?;
    put(
        LONG_ENTRY,
        &fits("long-mode entry", long, AP_LONG - LONG_ENTRY)?,
    );
    put(
        AP_LONG,
        &fits("long-mode AP", ap_long().map_err(asm)?, ENTER - AP_LONG)?,
    );
    put(
        ENTER,
        &fits("program entry", enter().map_err(asm)?, GDT64 - ENTER)?,
    );
    put(GDT64, &words(&GDT));
    let mut desc = [0u8; 6];
    desc[..2].copy_from_slice(&((GDT.len() * 8 - 1) as u16).to_le_bytes());
    desc[2..].copy_from_slice(&(GDT64 as u32).to_le_bytes());
    put(GDT64 + 64, &desc);
    // The boot data: the frame interval, the next AP's index, each vCPU's rbx.
    let mut info = vec![spec.frame_tsc, 1];
    info.extend((0..vcpus).map(|i| boot_regs(i, spec.seed).rbx));
    put(BOOT_INFO, &words(&info));
    put(
        AP_START,
        &fits("AP start", ap_start().map_err(asm)?, TARGET_PAGE)?,
    );
    put(CODE_GPA, &program::assemble().map_err(asm)?);
    disk.extend_from_slice(&region);
    disk.resize(disk.len().div_ceil(1 << 20) << 20, 0);
    Ok(disk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::HostPageSize;

    #[test]
    fn the_disk_image_holds_a_boot_sector_and_the_program() {
        let spec = DiskSpec {
            layout: GuestLayout::new(64 << 20, HostPageSize::Small, 1).unwrap(),
            workload: Workload::Random,
            seed: 1,
            frame_tsc: 1000,
        };
        let d = image(&spec).unwrap();
        assert_eq!(&d[510..512], &[0x55, 0xaa]);
        assert_eq!(d.len() % (1 << 20), 0);
        let load = (1 + 8) * 512;
        let code = program::assemble().unwrap();
        let at = load + (CODE_GPA - LOAD_BASE) as usize;
        assert_eq!(&d[at..at + code.len()], &code[..]);
        let params = &d[512..512 + 8];
        assert_eq!(
            u64::from_le_bytes(params.try_into().unwrap()),
            crate::guest::image::PARAMS_MAGIC
        );
        // Several vCPUs: each one's seed in the boot data, as the KVM guest's vCPUs get it.
        let four = DiskSpec {
            layout: GuestLayout::new(64 << 20, HostPageSize::Small, 4).unwrap(),
            ..spec.clone()
        };
        let d = image(&four).unwrap();
        let info = load + (BOOT_INFO - LOAD_BASE) as usize;
        let word =
            |i: usize| u64::from_le_bytes(d[info + 8 * i..info + 8 * i + 8].try_into().unwrap());
        assert_eq!((word(0), word(1)), (1000, 1));
        for v in 0..4 {
            assert_eq!(word(2 + v as usize), boot_regs(v, 1).rbx);
        }
        let many = GuestLayout::new(256 << 20, HostPageSize::Small, DISK_MAX_VCPUS + 1).unwrap();
        let e = image(&DiskSpec {
            layout: many,
            ..spec
        })
        .unwrap_err();
        assert!(e.contains("at most 16 vCPUs"), "{e}");
    }
}
