//! The same guest as a bootable raw disk image, for QEMU (or any PC firmware): a boot sector
//! that loads the rest, switches to protected mode and long mode, and enters the very same
//! program ([`super::kvm::program`]) at CPL 3, which builds its image itself (the firmware
//! leaves RAM zeroed) and then runs the workload, exactly as in the KVM harness.
//!
//! # Boot
//! 1. **Boot sector** (16-bit, at `0x7c00`, loaded by the BIOS): enables A20, loads the
//!    parameter page to [`PARAMS_GPA`] and the load region ([`LOAD_BASE`] .. [`LOAD_END`]:
//!    stage 2, the status page, the program) with `int 13h` extended reads, loads a flat
//!    GDT and jumps to stage 2 in 32-bit protected mode.
//! 2. **Stage 2** (32-bit, at [`STAGE2`]): builds identity page tables for the low 4 GiB in
//!    2 MiB pages (accessed and dirty preset, as [`super::kvm::boot`] builds them), enables
//!    PAE, long mode and paging, loads the 64-bit GDT and jumps to 64-bit code.
//! 3. **Long mode** (at [`LONG_ENTRY`]): `iretq` to the program at CPL 3 with IOPL 3 and the
//!    registers of the program's ABI (vCPU 0, parameter page, `rbx` from the parameter page).
//!
//! Differences from the KVM harness, all in the parameter page: RAM is one block below 4 GiB
//! (QEMU's `pc` machine; global pages map 1:1), the status page is RAM (at [`MAILBOX`]; no
//! host reads it during the run, and nothing asks the program to stop), and `init` asks the
//! program to build the image. One vCPU (the firmware starts only the first).

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use super::image::{mix64, Params};
use super::kvm::boot::GDT;
use super::kvm::program::{self, mailbox};
use super::layout::{
    GuestLayout, CODE_GPA, PARAMS_GPA, PDPT_GPA, PD_GPA, PML4_GPA, STACKS_GPA, TARGET_PAGE,
};
use super::Workload;

/// Where the boot sector loads stage 2, the status page and the program.
pub const LOAD_BASE: u64 = 0x48000;
/// End of the load region (the program's end, [`CODE_GPA`] + 64 KiB).
pub const LOAD_END: u64 = 0x60000;
/// Stage 2 (32-bit).
pub const STAGE2: u64 = 0x4c000;
/// Stage 2's 64-bit part.
pub const LONG_ENTRY: u64 = 0x4d000;
/// The 64-bit GDT and its descriptor.
pub const GDT64: u64 = 0x4d800;
/// The program's status page, in RAM.
pub const MAILBOX: u64 = 0x4e000;
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

fn long_entry() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    a.mov(ax, 0x10u32)?;
    a.mov(ds, ax)?;
    a.mov(es, ax)?;
    a.mov(ss, ax)?;
    // iretq to the program at CPL 3: ss, rsp, rflags (IOPL 3, interrupts off), cs, rip.
    a.push(0x23)?;
    a.push((STACKS_GPA + TARGET_PAGE) as i32)?;
    a.push(0x3002)?;
    a.push(0x1b)?;
    a.push(CODE_GPA as i32)?;
    a.xor(edi, edi)?;
    a.mov(esi, PARAMS_GPA as u32)?;
    a.mov(rbx, qword_ptr(PARAMS_GPA + Params::BOOT_RBX as u64))?;
    a.iretq()?;
    a.assemble(LONG_ENTRY)
}

/// The raw disk image: the boot sector, the parameter page, the load region; padded to a
/// whole MiB.
pub fn image(spec: &DiskSpec) -> Result<Vec<u8>, String> {
    let asm = |e: IcedError| format!("assembling the boot code: {e}");
    if spec.layout.vcpus() != 1 {
        return Err("a booted guest has one vCPU (the firmware starts only the first)".into());
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
    put(LONG_ENTRY, &long_entry().map_err(asm)?);
    put(GDT64, &words(&GDT));
    let mut desc = [0u8; 6];
    desc[..2].copy_from_slice(&((GDT.len() * 8 - 1) as u16).to_le_bytes());
    desc[2..].copy_from_slice(&(GDT64 as u32).to_le_bytes());
    put(GDT64 + 64, &desc);
    let mut status = [0u8; 16];
    status[8..].copy_from_slice(&spec.frame_tsc.to_le_bytes());
    debug_assert_eq!(mailbox::FRAME_TSC, 8);
    put(MAILBOX, &status);
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
        let two = GuestLayout::new(64 << 20, HostPageSize::Small, 2).unwrap();
        assert!(image(&DiskSpec {
            layout: two,
            ..spec
        })
        .is_err());
    }
}
