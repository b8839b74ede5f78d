//! The guest's memory image at the source, and the plan of where the guest works in it.
//!
//! The image is deterministic in `(mem, host page, seed)`: each 4 KiB target page is either a
//! zero page (about one in eight, as a freshly booted guest has many) or pseudo-random words,
//! except the key-value region, which holds an open-addressing hash table built before the
//! migration starts (the `kv` workload looks keys up in it at the destination). The source
//! computes a checksum of every target page once; the destination verifies against them.

use std::ops::Range;

use memmap2::MmapMut;
use pagehint::{LayoutError, RamLayout};

/// The unit of dirty tracking and of checksums.
pub const TARGET_PAGE: u64 = 4096;
const WORDS: usize = (TARGET_PAGE / 8) as usize;

/// The splitmix64 finaliser: a bijective 64-bit mixer.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A 64-bit checksum of one target page (four independent lanes, then mixed).
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

/// Where the guest's working sets lie, in target pages. They are placed away from page 0,
/// where the source's background scan starts (modelling where precopy left off), so that a
/// guest that does not pull the scan to itself waits for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestPlan {
    /// Target pages of guest RAM.
    pub pages: u64,
    /// Target pages per host page.
    pub host_pages_per: u64,
    /// The hash table (`kv`): an eighth of RAM starting at a quarter.
    pub kv: Range<u64>,
    /// The sequential window (`seq`): a thirty-second of RAM starting at the middle.
    pub seq: Range<u64>,
    /// The stream window (`stream`): a sixteenth of RAM starting at three quarters.
    pub stream: Range<u64>,
}

impl GuestPlan {
    /// The plan for `mem` bytes of RAM in host pages of `host_page` bytes.
    pub fn new(mem: u64, host_page: u64) -> Result<Self, String> {
        let per = host_page / TARGET_PAGE;
        let pages = mem / TARGET_PAGE;
        if host_page < TARGET_PAGE || per == 0 || mem % host_page != 0 {
            return Err(format!(
                "--mem {mem} is not a whole number of {host_page}-byte host pages"
            ));
        }
        if pages < 32 * per {
            return Err(format!(
                "--mem {mem} is too small: need at least 32 host pages of {host_page} bytes"
            ));
        }
        let down = |p: u64| p / per * per;
        let span = |start: u64, len: u64| down(start)..down(start) + down(len).max(per);
        Ok(Self {
            pages,
            host_pages_per: per,
            kv: span(pages / 4, pages / 8),
            seq: span(pages / 2, pages / 32),
            stream: span(pages / 4 * 3, pages / 16),
        })
    }

    /// Hash table geometry: `(first slot byte offset, slot count, key count)`.
    pub fn kv_table(&self) -> (u64, u64, u64) {
        let slots = (self.kv.end - self.kv.start) * TARGET_PAGE / SLOT_BYTES;
        (self.kv.start * TARGET_PAGE, slots, slots / 2)
    }
}

/// Bytes per hash-table slot: a key and a value, little endian; key 0 marks an empty slot.
pub const SLOT_BYTES: u64 = 16;

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

fn is_zero_page(seed: u64, page: u64) -> bool {
    mix64(seed ^ 0x7a65_726f ^ page.wrapping_mul(0xd6e8_feb8_6659_fd93)) % 8 == 0
}

fn fill_random(seed: u64, page: u64, out: &mut [u8]) {
    let mut x = mix64(seed ^ page.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
    for w in out.chunks_exact_mut(8) {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        w.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
}

/// The source's copy of guest RAM, with per-page checksums.
#[derive(Debug)]
pub struct SourceImage {
    layout: RamLayout,
    plan: GuestPlan,
    seed: u64,
    mem: MmapMut,
    /// One checksum per target page.
    checksums: Vec<u64>,
    /// One flag per host page: every byte is zero.
    zero_host: Vec<bool>,
}

impl SourceImage {
    /// Builds the image for `mem` bytes in host pages of `host_page` bytes.
    pub fn build(mem: u64, host_page: u64, seed: u64) -> Result<Self, String> {
        let plan = GuestPlan::new(mem, host_page)?;
        let layout = RamLayout::single("pc.ram", mem, host_page)
            .map_err(|e: LayoutError| format!("bad guest layout: {e}"))?;
        let len = usize::try_from(mem).map_err(|_| format!("--mem {mem} does not fit"))?;
        let mut map = MmapMut::map_anon(len).map_err(|e| format!("mapping {mem} bytes: {e}"))?;
        // Huge pages where the kernel has them: faster to fill, and nothing left for
        // khugepaged to collapse (and steal CPU) during the first migration.
        let _ = map.advise(memmap2::Advice::HugePage);
        for (p, page) in map.chunks_exact_mut(TARGET_PAGE as usize).enumerate() {
            let p = p as u64;
            if plan.kv.contains(&p) || is_zero_page(seed, p) {
                continue; // anonymous memory is already zero
            }
            fill_random(seed, p, page);
        }
        let (base, slots, keys) = plan.kv_table();
        let table = &mut map[base as usize..(base + slots * SLOT_BYTES) as usize];
        for i in 0..keys {
            let key = kv_key(seed, i);
            let mut s = kv_home(key, slots);
            loop {
                let at = (s * SLOT_BYTES) as usize;
                let k = u64::from_le_bytes(table[at..at + 8].try_into().expect("8 bytes"));
                if k == 0 || k == key {
                    table[at..at + 8].copy_from_slice(&key.to_le_bytes());
                    table[at + 8..at + 16].copy_from_slice(&kv_value(key).to_le_bytes());
                    break;
                }
                s = (s + 1) % slots;
            }
        }
        let mut checksums = Vec::with_capacity(plan.pages as usize);
        let mut zero_target = Vec::with_capacity(plan.pages as usize);
        for page in map.chunks_exact(TARGET_PAGE as usize) {
            checksums.push(page_checksum(page));
            zero_target.push(page.iter().all(|&b| b == 0));
        }
        let zero_host = zero_target
            .chunks_exact(plan.host_pages_per as usize)
            .map(|c| c.iter().all(|&z| z))
            .collect();
        debug_assert_eq!(WORDS * 8, TARGET_PAGE as usize);
        Ok(Self {
            layout,
            plan,
            seed,
            mem: map,
            checksums,
            zero_host,
        })
    }

    /// The layout (one block, `pc.ram`).
    pub fn layout(&self) -> &RamLayout {
        &self.layout
    }
    /// The guest plan.
    pub fn plan(&self) -> &GuestPlan {
        &self.plan
    }
    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Bytes `[offset, offset + len)` of guest RAM.
    pub fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        &self.mem[offset as usize..(offset + len) as usize]
    }
    /// Per-target-page checksums.
    pub fn checksums(&self) -> &[u64] {
        &self.checksums
    }
    /// Whether host page `index` is all zeros.
    pub fn host_page_is_zero(&self, index: u64) -> bool {
        self.zero_host[index as usize]
    }
    /// Number of all-zero host pages.
    pub fn zero_host_pages(&self) -> u64 {
        self.zero_host.iter().filter(|&&z| z).count() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_deterministic_and_table_answers_every_key() {
        let a = SourceImage::build(4 << 20, 4096, 7).unwrap();
        let b = SourceImage::build(4 << 20, 4096, 7).unwrap();
        let c = SourceImage::build(4 << 20, 4096, 8).unwrap();
        assert_eq!(a.checksums(), b.checksums());
        assert_ne!(a.checksums(), c.checksums());
        assert!(a.zero_host_pages() > 0);
        let (base, slots, keys) = a.plan().kv_table();
        let t = a.bytes(base, slots * SLOT_BYTES);
        for i in 0..keys {
            let key = kv_key(7, i);
            let mut s = kv_home(key, slots);
            loop {
                let at = (s * SLOT_BYTES) as usize;
                let k = u64::from_le_bytes(t[at..at + 8].try_into().unwrap());
                assert_ne!(k, 0, "key {i} lost");
                if k == key {
                    let v = u64::from_le_bytes(t[at + 8..at + 16].try_into().unwrap());
                    assert_eq!(v, kv_value(key));
                    break;
                }
                s = (s + 1) % slots;
            }
        }
    }

    #[test]
    fn plan_rejects_bad_sizes() {
        assert!(GuestPlan::new(4096 * 31, 4096).is_err());
        assert!(GuestPlan::new((2 << 20) * 3 + 4096, 2 << 20).is_err());
        let p = GuestPlan::new(64 << 20, 2 << 20).unwrap();
        assert_eq!(p.seq.start % 512, 0);
        assert!(p.seq.end > p.seq.start);
    }
}
