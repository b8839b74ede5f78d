//! How `pagehint-uffd` loads pages: every fact of each policy in one place (its name, the
//! scheduler it runs, its background scans and how many prefetchers run them, whether it
//! writes or follows a record of a restore's faults, and whether a restore waits for
//! everything to load).
//!
//! **Adding a policy**: a line in the `policies!` list (its name; `ALL` follows) and an arm
//! in each `match` here (the compiler names every one left out); the handler ([`super::handler`]) and the comparison
//! ([`super::compare`]) ask these and name no policy themselves.

use pagehint::SchedulerConfig;

/// The background scans a policy runs beside the fault path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// None: only faulted pages are loaded.
    None,
    /// One prefetcher from page 0 upwards, ignoring faults.
    FromStart,
    /// The asked-for prefetchers, evenly spaced across memory (following the hint where the
    /// scheduler offers it).
    Spaced,
    /// One prefetcher places the recorded pages, in the recorded order, and stops.
    Record,
    /// One prefetcher places the recorded pages in order, taking a step after each fault's
    /// hint whenever one is pending (what the record did not predict), then scans on with
    /// the hint; any further prefetchers scan as [`Scan::Spaced`] from the start.
    RecordThenHint,
}

/// Declares the policies once: the enum, [`Policy::ALL`] and [`Policy::name`] from one list
/// (its name is also its JSON).
macro_rules! policies {
    ($($(#[$m:meta])* $v:ident = $name:literal,)+) => {
        /// How pages are loaded.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Policy {
            $($(#[$m])* $v,)+
        }

        impl Policy {
            /// Every policy, in the comparison's order.
            pub const ALL: [Self; [$(stringify!($v)),+].len()] = [$(Self::$v),+];

            /// The name used on the command line and in tables.
            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$v => $name,)+
                }
            }
        }
    };
}

policies! {
    /// One page per fault and nothing else (Firecracker's sample handler).
    OnDemand = "on-demand",
    /// Faults served, and one prefetcher from page 0 upwards, ignoring faults (Cloud
    /// Hypervisor's postcopy).
    Linear = "linear",
    /// Faults served, and the prefetchers without the hint (evenly spaced linear scans).
    PagehintNoHint = "pagehint-nohint",
    /// Faults served, and the prefetchers follow each fault (the hint).
    Pagehint = "pagehint",
    /// Faults served on demand, as [`Policy::OnDemand`], and their order written down: each
    /// host page's first fault, as its memory-file offset (`--record`), for the next restore.
    Record = "record",
    /// Faults served, and one prefetcher places the recorded pages first, in order, and
    /// nothing else (REAP's and FaaSnap's working-set prefetch).
    Recorded = "recorded",
    /// The record first, in order, while the fault-following hint serves what it did not
    /// predict; then the hinted scan loads the rest.
    RecordedPagehint = "recorded+pagehint",
}

impl Policy {
    /// Parses [`name`](Self::name).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Every name, for messages: `a, b, c`.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The policies `pagehint-uffd compare` restores with by default, in its order (the
    /// record run that `recorded` and `recorded+pagehint` follow comes first, apart).
    pub const COMPARED: [Self; 5] = [
        Self::OnDemand,
        Self::Linear,
        Self::Pagehint,
        Self::Recorded,
        Self::RecordedPagehint,
    ];

    /// The scheduler behind the fault path and the scans: with the hint (pagehint) or
    /// without.
    pub fn scheduler(self) -> SchedulerConfig {
        match self {
            Self::Pagehint | Self::RecordedPagehint => SchedulerConfig::preempt_hint(),
            Self::OnDemand
            | Self::Linear
            | Self::PagehintNoHint
            | Self::Record
            | Self::Recorded => SchedulerConfig::preempt(),
        }
    }

    /// Its background scans.
    pub fn scan(self) -> Scan {
        match self {
            Self::OnDemand | Self::Record => Scan::None,
            Self::Linear => Scan::FromStart,
            Self::PagehintNoHint | Self::Pagehint => Scan::Spaced,
            Self::Recorded => Scan::Record,
            Self::RecordedPagehint => Scan::RecordThenHint,
        }
    }

    /// Prefetcher threads it runs when `asked` for (its scans decide).
    pub fn prefetchers(self, asked: usize) -> usize {
        match self.scan() {
            Scan::None => 0,
            Scan::FromStart | Scan::Record => 1,
            Scan::Spaced | Scan::RecordThenHint => asked.max(1),
        }
    }

    /// Whether it writes a record of the faults (to `--record`).
    pub fn writes_record(self) -> bool {
        self == Self::Record
    }

    /// Whether it follows a record (read from `--record`).
    pub fn follows_record(self) -> bool {
        matches!(self.scan(), Scan::Record | Scan::RecordThenHint)
    }

    /// Whether a restore lingers after its run until every page is loaded: only where a
    /// scan loads every page (where nothing but faults and a record load pages, it would wait
    /// forever for pages never touched).
    pub fn lingers(self) -> bool {
        match self.scan() {
            Scan::None | Scan::Record => false,
            Scan::FromStart | Scan::Spaced | Scan::RecordThenHint => true,
        }
    }
}

impl serde::Serialize for Policy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_policy_says_how_it_loads() {
        for p in Policy::ALL {
            assert_eq!(Policy::parse(p.name()), Some(p));
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                p.name(),
                "its JSON is its name"
            );
        }
        assert_eq!(Policy::OnDemand.prefetchers(4), 0);
        assert!(!Policy::OnDemand.lingers());
        assert_eq!(Policy::Linear.prefetchers(4), 1);
        assert_eq!(Policy::Pagehint.prefetchers(4), 4);
        assert_eq!(Policy::PagehintNoHint.prefetchers(0), 1);
        assert!(Policy::Linear.lingers() && Policy::Pagehint.lingers());
        assert_eq!(Policy::Record.prefetchers(4), 0);
        assert!(Policy::Record.writes_record() && !Policy::Record.follows_record());
        assert!(!Policy::Record.lingers() && !Policy::Recorded.lingers());
        assert_eq!(Policy::Recorded.prefetchers(4), 1);
        assert_eq!(Policy::RecordedPagehint.prefetchers(3), 3);
        assert!(Policy::RecordedPagehint.follows_record() && Policy::RecordedPagehint.lingers());
        assert!(Policy::COMPARED.iter().all(|p| !p.writes_record()));
        assert_eq!(
            Policy::names(),
            "on-demand, linear, pagehint-nohint, pagehint, record, recorded, recorded+pagehint"
        );
    }
}
