//! The guest's memory image: signed pages, the generation table, the hash table, the
//! parameter page, and the checksums the destination is verified against.
//!
//! # Signed pages
//! Every page of the data area carries a signature that the guest checks on every read:
//!
//! | word | contents |
//! |---|---|
//! | 0 | [`page_sum`] of words 1..512 |
//! | 1 | the page's guest-physical page number (`gpa >> 12`) |
//! | 2 | [`PAGE_TAG`] `|` generation |
//! | 3..512 | pseudo-random data, or hash-table slots in the `kv` window |
//!
//! The **generation table** (one `u32` per global page at
//! [`GENTAB_GPA`])
//! says what each page must hold: generation 0 is a zero page (never written: every byte
//! zero, as most of a fresh guest's RAM is); an even generation `g > 0` is a signed page of
//! generation `g`; an odd value means the page's writer is rewriting it (a seqlock: readers
//! retry). So the guest tells apart a **lost** page (zeros where a signed page belongs), a
//! **misplaced** one (another page's number), a **stale** one (an older generation than the
//! table's: a write the migration lost) and a **corrupt** one (the sum does not match).
//!
//! A page is written only by its owner vCPU (see [`crate::guest::kvm::program`]), which
//! makes the table entry odd, rewrites words 1, 2 and 0, and makes it even again, two higher.
//!
//! # The hash table
//! The `kv` window holds an open-addressing table of 16-byte slots (key, value), 254 per page
//! after the 32-byte signature header. Key 0 marks an empty slot; half the slots hold keys.

use crate::names::code_enum;
use std::ops::Range;

use super::layout::{GuestLayout, GENTAB_GPA, MAILBOX_GPA, MAX_VCPUS, TARGET_PAGE};
use super::Workload;

/// Words per target page.
pub const WORDS: usize = (TARGET_PAGE / 8) as usize;
/// Word 2 of a signed page: this tag in the high 32 bits, the generation in the low 32.
pub const PAGE_TAG: u64 = 0x5047_4e53 << 32;
/// [`page_sum`]'s starting value.
pub const SUM_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// [`page_sum`]'s multiplier (odd).
pub const SUM_MUL: u64 = 0x0000_0100_0000_01b3;
/// [`page_sum`]'s rotation.
pub const SUM_ROT: u32 = 29;
/// Hash-table slots per page (the first 32 bytes are the signature).
pub const SLOTS_PER_PAGE: u64 = 254;
/// Bytes per slot.
pub const SLOT_BYTES: u64 = 16;
/// Byte offset of slot 0 in a page.
pub const SLOT_BASE: u64 = 32;
/// Generation of every signed page of a fresh image.
pub const FIRST_GEN: u32 = 2;

/// The signature sum of a page: words 1..512 folded by `h = rotl((h ^ w) * MUL, ROT)` from
/// [`SUM_SEED`]. Cheap enough for the guest to compute on every read (about a microsecond).
pub fn page_sum(words: &[u64]) -> u64 {
    words[1..].iter().fold(SUM_SEED, |h, &w| {
        (h ^ w).wrapping_mul(SUM_MUL).rotate_left(SUM_ROT)
    })
}

/// The splitmix64 finaliser: a bijective 64-bit mixer (the guest has the same code).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit checksum of a whole target page, for comparing source and destination.
pub fn page_checksum(page: &[u8]) -> u64 {
    let mut lanes = [
        0x9e37_79b9_7f4a_7c15u64,
        0xc2b2_ae3d_27d4_eb4f,
        0x1656_67b1_9e37_79f9,
        0x27d4_eb2f_1656_67c5,
    ];
    for chunk in page.chunks_exact(32) {
        for (lane, w) in lanes.iter_mut().zip(chunk.chunks_exact(8)) {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            *lane = (*lane ^ w)
                .wrapping_mul(0x0000_0100_0000_01b3)
                .rotate_left(29);
        }
    }
    mix64(lanes[0] ^ mix64(lanes[1] ^ mix64(lanes[2] ^ mix64(lanes[3]))))
}

code_enum!(
    /// What is wrong with a page, as the guest (or the host, with the same rules) finds it.
    /// The codes are those the guest writes to its status page.
    pub enum PageFault: u64 {
        /// Zeros where a signed page belongs: the page was never placed with its contents.
        Lost = 1,
        /// Another page's number.
        Misplaced = 2,
        /// An older (or unknown) generation than the table's: a write was lost or undone.
        Stale = 3,
        /// The sum does not match the contents.
        Corrupt = 4,
        /// A zero page holds data.
        NotZero = 5,
        /// A key lookup found a wrong value.
        WrongValue = 6,
        /// A stored key was not found.
        MissingKey = 7,
    }
);

impl PageFault {
    /// In words.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Lost => "lost page (zeros where data belongs)",
            Self::Misplaced => "misplaced page (another page's number)",
            Self::Stale => "stale page (older generation than the guest wrote)",
            Self::Corrupt => "corrupt page (sum does not match)",
            Self::NotZero => "zero page holds data",
            Self::WrongValue => "key lookup returned a wrong value",
            Self::MissingKey => "stored key not found",
        }
    }
}

/// Checks one page as the guest does: `gen` from the generation table, `gpfn` its
/// guest-physical page number.
pub fn check_page(words: &[u64], gpfn: u64, gen: u32) -> Result<(), PageFault> {
    if gen == 0 {
        return if words.iter().all(|&w| w == 0) {
            Ok(())
        } else {
            Err(PageFault::NotZero)
        };
    }
    if words[1] == 0 && words[2] == 0 {
        Err(PageFault::Lost)
    } else if words[1] != gpfn {
        Err(PageFault::Misplaced)
    } else if words[2] != PAGE_TAG | u64::from(gen) {
        Err(PageFault::Stale)
    } else if words[0] != page_sum(words) {
        Err(PageFault::Corrupt)
    } else {
        Ok(())
    }
}

/// Signs `words` as page `gpfn` of generation `gen`.
pub fn sign(words: &mut [u64], gpfn: u64, gen: u32) {
    words[1] = gpfn;
    words[2] = PAGE_TAG | u64::from(gen);
    words[0] = page_sum(words);
}

/// The `i`-th key stored in the table (never 0).
pub fn kv_key(seed: u64, i: u64) -> u64 {
    mix64(seed ^ 0x6b65_795f_7365_6564 ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1)
}

/// The value stored with `key`.
pub fn kv_value(key: u64) -> u64 {
    mix64(key ^ 0x7661_6c75_6500_0000)
}

/// The first slot probed for `key` in a table of `slots` slots.
pub fn kv_home(key: u64, slots: u64) -> u64 {
    ((u128::from(mix64(key ^ 0x686f_6d65)) * u128::from(slots)) >> 64) as u64
}

/// Global page and byte offset in it of slot `slot` of a table starting at page `first`.
pub fn kv_slot(first: u64, slot: u64) -> (u64, u64) {
    (
        first + slot / SLOTS_PER_PAGE,
        SLOT_BASE + (slot % SLOTS_PER_PAGE) * SLOT_BYTES,
    )
}

/// Hash-table geometry: `(slots, keys)` of a table in `window`.
pub fn kv_geometry(window: &Range<u64>) -> (u64, u64) {
    let slots = (window.end - window.start) * SLOTS_PER_PAGE;
    (slots, slots / 2)
}

/// Whether data page `page` starts as a zero page (about one in eight).
pub fn starts_zero(seed: u64, page: u64) -> bool {
    mix64(seed ^ 0x7a65_726f ^ page.wrapping_mul(0xd6e8_feb8_6659_fd93)).is_multiple_of(8)
}

fn fill_random(seed: u64, page: u64, out: &mut [u64]) {
    let mut x = mix64(seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    for w in out {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *w = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
}

/// The parameter page the guest program reads at boot (little-endian `u64` words at
/// [`PARAMS_GPA`](super::layout::PARAMS_GPA)). The field order is the program's ABI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Params {
    /// Workload code: 1 seq, 2 random, 3 stream, 4 kv.
    pub workload: u64,
    /// vCPUs.
    pub vcpus: u64,
    /// Global pages of RAM.
    pub pages: u64,
    /// Pages below the hole.
    pub low_pages: u64,
    /// Guest-physical address of block 1.
    pub high_base: u64,
    /// The data area.
    pub data: Range<u64>,
    /// The seq window.
    pub seq: Range<u64>,
    /// The stream window.
    pub stream: Range<u64>,
    /// The hash table's window.
    pub kv: Range<u64>,
    /// Hash-table slots.
    pub kv_slots: u64,
    /// Keys stored.
    pub kv_keys: u64,
    /// The image and workload seed.
    pub seed: u64,
    /// Guest-physical address of the generation table.
    pub gentab: u64,
    /// Guest-physical address of vCPU 0's status page.
    pub mailbox: u64,
    /// Target pages per stream frame.
    pub frame_pages: u64,
    /// 1: vCPU 0 builds the image itself before the workload (a booted guest, whose RAM
    /// starts zeroed; it sets this to 2 when done); 0: the host built it.
    pub init: u64,
    /// `rbx` for a booted guest's boot code to hand the program (the ABI's random seed).
    pub boot_rbx: u64,
    /// Each vCPU's own seq window ([`GuestLayout::seq_window`]), in vCPU order.
    pub seq_windows: Vec<Range<u64>>,
    /// Each vCPU's own stream window ([`GuestLayout::stream_window`]), in vCPU order.
    pub stream_windows: Vec<Range<u64>>,
}

/// Magic word 0 of the parameter page.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"PHGUEST1");

impl Params {
    /// Word offsets of the fields (the guest program reads these).
    pub const WORKLOAD: i32 = 8;
    /// See [`Params::vcpus`].
    pub const VCPUS: i32 = 16;
    /// See [`Params::pages`].
    pub const PAGES: i32 = 24;
    /// See [`Params::low_pages`].
    pub const LOW_PAGES: i32 = 32;
    /// See [`Params::high_base`].
    pub const HIGH_BASE: i32 = 40;
    /// See [`Params::data`] (start; end follows).
    pub const DATA: i32 = 48;
    /// See [`Params::seq`].
    pub const SEQ: i32 = 64;
    /// See [`Params::stream`].
    pub const STREAM: i32 = 80;
    /// See [`Params::kv`].
    pub const KV: i32 = 96;
    /// See [`Params::kv_slots`].
    pub const KV_SLOTS: i32 = 112;
    /// See [`Params::kv_keys`].
    pub const KV_KEYS: i32 = 120;
    /// See [`Params::seed`].
    pub const SEED: i32 = 128;
    /// See [`Params::gentab`].
    pub const GENTAB: i32 = 136;
    /// See [`Params::mailbox`].
    pub const MAILBOX: i32 = 144;
    /// See [`Params::frame_pages`].
    pub const FRAME_PAGES: i32 = 152;
    /// See [`Params::init`].
    pub const INIT: i32 = 160;
    /// See [`Params::boot_rbx`].
    pub const BOOT_RBX: i32 = 168;
    /// See [`Params::seq_windows`]: vCPU `i`'s window (start, end) at `SEQ_WINDOWS + 16 i`.
    pub const SEQ_WINDOWS: i32 = 256;
    /// See [`Params::stream_windows`]: vCPU `i`'s at `STREAM_WINDOWS + 16 i`.
    pub const STREAM_WINDOWS: i32 = Self::SEQ_WINDOWS + 16 * MAX_VCPUS as i32;
    /// Words of an encoded parameter page.
    pub const WORDS: usize = (Self::STREAM_WINDOWS as usize + 16 * MAX_VCPUS as usize) / 8;

    /// The parameters of `layout` running `workload` with `seed`.
    pub fn new(layout: &GuestLayout, workload: Workload, seed: u64, frame_pages: u64) -> Self {
        let (kv_slots, kv_keys) = kv_geometry(&layout.kv);
        Self {
            workload: workload.code(),
            vcpus: u64::from(layout.vcpus()),
            pages: layout.pages(),
            low_pages: layout.low_pages(),
            high_base: super::layout::HIGH_BASE,
            data: layout.data.clone(),
            seq: layout.seq.clone(),
            stream: layout.stream.clone(),
            kv: layout.kv.clone(),
            kv_slots,
            kv_keys,
            seed,
            gentab: GENTAB_GPA,
            mailbox: MAILBOX_GPA,
            frame_pages,
            init: 0,
            boot_rbx: 0,
            seq_windows: (0..layout.vcpus()).map(|v| layout.seq_window(v)).collect(),
            stream_windows: (0..layout.vcpus())
                .map(|v| layout.stream_window(v))
                .collect(),
        }
    }

    /// The page's words ([`WORDS`](Self::WORDS) of them; the rest of the page is zero).
    pub fn encode(&self) -> Vec<u64> {
        let mut w = vec![0u64; Self::WORDS];
        let head = [
            PARAMS_MAGIC,
            self.workload,
            self.vcpus,
            self.pages,
            self.low_pages,
            self.high_base,
            self.data.start,
            self.data.end,
            self.seq.start,
            self.seq.end,
            self.stream.start,
            self.stream.end,
            self.kv.start,
            self.kv.end,
            self.kv_slots,
            self.kv_keys,
            self.seed,
            self.gentab,
            self.mailbox,
            self.frame_pages,
            self.init,
            self.boot_rbx,
        ];
        w[..head.len()].copy_from_slice(&head);
        for (table, windows) in [
            (Self::SEQ_WINDOWS, &self.seq_windows),
            (Self::STREAM_WINDOWS, &self.stream_windows),
        ] {
            for (i, r) in windows.iter().enumerate() {
                let at = table as usize / 8 + 2 * i;
                w[at] = r.start;
                w[at + 1] = r.end;
            }
        }
        w
    }
}

/// Writes the contents of guest RAM before the guest boots, minus the parameter page and the
/// program (which depend on the run), into `ram` (all of RAM in global page order, every byte
/// zero: fresh anonymous memory): the generation table, every data page, the hash table, and
/// `system` (the boot pieces: `(guest-physical address, bytes)`, all in the system area).
///
/// The source builds it straight into its guest RAM, so that a migration holds two copies of
/// guest RAM (the source's and the destination's), not a third kept to copy from.
pub fn build_image(
    layout: &GuestLayout,
    seed: u64,
    system: &[(u64, Vec<u8>)],
    ram: &mut [u8],
) -> std::io::Result<()> {
    if ram.len() as u64 != layout.mem() || ram.as_ptr().align_offset(8) != 0 {
        return Err(std::io::Error::other(format!(
            "the image needs {} bytes of 8-byte aligned RAM, not {} at {:p}",
            layout.mem(),
            ram.len(),
            ram.as_ptr()
        )));
    }
    let len = ram.len();
    let pages = layout.pages();
    let mut gens = vec![0u32; pages as usize];
    {
        // SAFETY: aligned for u64 (checked), `len` is a multiple of 8 (whole pages), and the
        // slice borrows `ram` mutably for its lifetime.
        let words: &mut [u64] =
            unsafe { std::slice::from_raw_parts_mut(ram.as_mut_ptr().cast(), len / 8) };
        for (p, page) in words.chunks_exact_mut(WORDS).enumerate() {
            let p = p as u64;
            if !layout.data.contains(&p) {
                continue;
            }
            if layout.kv.contains(&p) {
                // Signed below, after the keys are in.
                gens[p as usize] = FIRST_GEN;
                continue;
            }
            if starts_zero(seed, p) {
                continue;
            }
            fill_random(seed, p, &mut page[3..]);
            sign(page, layout.gpa(p) / TARGET_PAGE, FIRST_GEN);
            gens[p as usize] = FIRST_GEN;
        }
        let (slots, keys) = kv_geometry(&layout.kv);
        let kv0 = layout.kv.start;
        for i in 0..keys {
            let key = kv_key(seed, i);
            let mut s = kv_home(key, slots);
            loop {
                let (page, off) = kv_slot(kv0, s);
                let at = (page * TARGET_PAGE + off) as usize / 8;
                if words[at] == 0 || words[at] == key {
                    words[at] = key;
                    words[at + 1] = kv_value(key);
                    break;
                }
                s = (s + 1) % slots;
            }
        }
        for p in layout.kv.clone() {
            let at = (p * TARGET_PAGE) as usize / 8;
            sign(
                &mut words[at..at + WORDS],
                layout.gpa(p) / TARGET_PAGE,
                FIRST_GEN,
            );
        }
    }
    let gt = GENTAB_GPA as usize;
    for (i, g) in gens.iter().enumerate() {
        ram[gt + i * 4..gt + i * 4 + 4].copy_from_slice(&g.to_le_bytes());
    }
    let system_end = layout.system().end * TARGET_PAGE;
    for (gpa, bytes) in system {
        let end = gpa + bytes.len() as u64;
        if end > system_end || end > GENTAB_GPA {
            return Err(std::io::Error::other(format!(
                "boot piece at {gpa:#x} ({} bytes) is outside the system area",
                bytes.len()
            )));
        }
        ram[*gpa as usize..end as usize].copy_from_slice(bytes);
    }
    Ok(())
}

/// The image of [`build_image`] in memory of its own, for what copies it into guest RAM
/// that is mapped elsewhere (a snapshot file, a test's VM).
#[derive(Debug)]
pub struct Template {
    layout: GuestLayout,
    seed: u64,
    mem: memmap2::MmapMut,
}

impl Template {
    /// Builds the template, with `system` (the boot pieces: `(guest-physical address,
    /// bytes)`, all in the system area) written in.
    pub fn build(
        layout: &GuestLayout,
        seed: u64,
        system: &[(u64, Vec<u8>)],
    ) -> std::io::Result<Self> {
        let len = usize::try_from(layout.mem()).map_err(std::io::Error::other)?;
        let mut mem = memmap2::MmapMut::map_anon(len)?;
        // Huge pages where the kernel has them: faster to fill.
        let _ = mem.advise(memmap2::Advice::HugePage);
        build_image(layout, seed, system, &mut mem)?;
        Ok(Self {
            layout: layout.clone(),
            seed,
            mem,
        })
    }

    /// The layout it was built for.
    pub fn layout(&self) -> &GuestLayout {
        &self.layout
    }
    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// All of RAM, global page order.
    pub fn bytes(&self) -> &[u8] {
        &self.mem
    }
}

/// Reads the generation of `page` from a RAM image in global page order.
pub fn generation(ram: &[u8], page: u64) -> u32 {
    let at = (GENTAB_GPA + page * 4) as usize;
    u32::from_le_bytes(ram[at..at + 4].try_into().expect("4 bytes"))
}

/// Page `page` of a RAM image in global page order, as words.
pub fn words_of(ram: &[u8], page: u64) -> Vec<u64> {
    ram[(page * TARGET_PAGE) as usize..((page + 1) * TARGET_PAGE) as usize]
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::layout::HostPageSize;

    #[test]
    fn template_pages_pass_the_guest_check_and_the_table_answers_every_key() {
        let l = GuestLayout::new(16 << 20, HostPageSize::Small, 1).unwrap();
        let t = Template::build(&l, 7, &[(0x50000, vec![0x90; 16])]).unwrap();
        assert_eq!(&t.bytes()[0x50000..0x50010], &[0x90; 16]);
        let ram = t.bytes();
        let mut zero = 0;
        for p in l.data.clone() {
            let g = generation(ram, p);
            zero += u64::from(g == 0);
            check_page(&words_of(ram, p), l.gpa(p) / TARGET_PAGE, g)
                .unwrap_or_else(|e| panic!("page {p}: {e:?}"));
        }
        assert!(zero > 0, "some zero pages");
        let (slots, keys) = kv_geometry(&l.kv);
        for i in 0..keys {
            let key = kv_key(7, i);
            let mut s = kv_home(key, slots);
            loop {
                let (page, off) = kv_slot(l.kv.start, s);
                let at = (page * TARGET_PAGE + off) as usize;
                let k = u64::from_le_bytes(ram[at..at + 8].try_into().unwrap());
                assert_ne!(k, 0, "key {i} lost");
                if k == key {
                    let v = u64::from_le_bytes(ram[at + 8..at + 16].try_into().unwrap());
                    assert_eq!(v, kv_value(key));
                    break;
                }
                s = (s + 1) % slots;
            }
        }
    }

    #[test]
    fn the_check_tells_each_fault_apart() {
        let mut w = vec![0u64; WORDS];
        w[100] = 42;
        sign(&mut w, 77, 4);
        assert_eq!(check_page(&w, 77, 4), Ok(()));
        assert_eq!(check_page(&w, 78, 4), Err(PageFault::Misplaced));
        assert_eq!(check_page(&w, 77, 6), Err(PageFault::Stale));
        assert_eq!(check_page(&vec![0; WORDS], 77, 4), Err(PageFault::Lost));
        assert_eq!(check_page(&w, 77, 0), Err(PageFault::NotZero));
        w[300] ^= 1;
        assert_eq!(check_page(&w, 77, 4), Err(PageFault::Corrupt));
    }
}
