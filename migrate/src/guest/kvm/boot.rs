//! What a vCPU boots into: identity page tables, a GDT, the program, and each vCPU's first
//! registers (64-bit mode at CPL 3, see [`super::program`]).
//!
//! No firmware runs: the host writes the tables into the system area of the image and sets
//! the vCPU's registers directly, as a VMM's direct kernel boot does. The tables map guest
//! physical memory 1:1 in 2 MiB pages from 0 to the end of RAM (the hole with the status
//! pages included), user-accessible and writable, with their accessed and dirty bits preset.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

use super::program;
use crate::guest::image::mix64;
use crate::guest::layout::{GuestLayout, PARAMS_GPA, PDPT_GPA, PD_GPA, PML4_GPA, STACKS_GPA};

/// Where the GDT lies (in page 0).
pub const GDT_GPA: u64 = 0x500;
/// GDT: null, kernel code (64-bit), kernel data, user code (64-bit), user data.
pub const GDT: [u64; 5] = [
    0,
    0x00af_9a00_0000_ffff,
    0x00cf_9200_0000_ffff,
    0x00af_fa00_0000_ffff,
    0x00cf_f200_0000_ffff,
];
/// User code selector (GDT entry 3, RPL 3).
const USER_CS: u16 = 0x1b;
/// User data selector (GDT entry 4, RPL 3).
const USER_DS: u16 = 0x23;

const PTE_PRESENT: u64 = 1;
const PTE_WRITE: u64 = 2;
const PTE_USER: u64 = 4;
const PTE_ACCESSED: u64 = 0x20;
const PTE_DIRTY: u64 = 0x40;
const PTE_HUGE: u64 = 0x80;

/// `(guest-physical address, bytes)` of everything the boot needs in guest RAM: the GDT,
/// the page tables and the program. Independent of the workload (the parameter page says
/// which one runs), so it is part of the image
/// ([`build_image`](crate::guest::image::build_image)).
pub fn system_pieces(layout: &GuestLayout) -> Result<Vec<(u64, Vec<u8>)>, String> {
    let words = |w: &[u64]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let gib = layout.gpa_end().div_ceil(1 << 30);
    // Accessed and dirty set up front: the MMU never writes the tables, so they stay equal
    // to the source's (verification compares every page the guest does not write).
    let flags = PTE_PRESENT | PTE_WRITE | PTE_USER | PTE_ACCESSED;
    let pml4 = [PDPT_GPA | flags];
    let pdpt: Vec<u64> = (0..gib).map(|i| (PD_GPA + i * 4096) | flags).collect();
    let pds: Vec<u64> = (0..gib * 512)
        .map(|i| (i << 21) | flags | PTE_DIRTY | PTE_HUGE)
        .collect();
    let code = program::assemble().map_err(|e| format!("assembling the guest program: {e}"))?;
    Ok(vec![
        (GDT_GPA, words(&GDT)),
        (PML4_GPA, words(&pml4)),
        (PDPT_GPA, words(&pdpt)),
        (PD_GPA, words(&pds)),
        (program::ENTRY, code),
    ])
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 11 } else { 3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The system registers every vCPU boots with, over `base` (what `KVM_GET_SREGS` returned
/// for a fresh vCPU): long mode, paging from [`PML4_GPA`], user code and data segments.
pub fn boot_sregs(mut s: kvm_sregs) -> kvm_sregs {
    let cs = segment(USER_CS, true);
    let ds = segment(USER_DS, false);
    s.cs = cs;
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.gdt.base = GDT_GPA;
    s.gdt.limit = (GDT.len() * 8 - 1) as u16;
    s.cr3 = PML4_GPA;
    s.cr4 = 0x20; // PAE
    s.cr0 = 0x8000_0031; // PG | NE | ET | PE
    s.efer = 0x500; // LMA | LME
    s
}

/// The general registers vCPU `index` boots with (see the program's ABI).
pub fn boot_regs(index: u32, seed: u64) -> kvm_regs {
    kvm_regs {
        rip: program::ENTRY,
        rsp: STACKS_GPA + (u64::from(index) + 1) * 4096,
        rdi: u64::from(index),
        rsi: PARAMS_GPA,
        rbx: mix64(seed ^ (u64::from(index) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
        rflags: 0x3002, // IOPL 3, reserved bit 1; interrupts off
        ..Default::default()
    }
}
