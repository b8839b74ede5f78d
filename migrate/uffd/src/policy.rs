//! How `pagehint-uffd` loads pages: every fact of each policy in one place (its name, the
//! scheduler it runs, its background scans and how many prefetchers run them, and whether
//! a restore waits for everything to load).
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

    /// The scheduler behind the fault path and the scans: with the hint (pagehint) or
    /// without.
    pub fn scheduler(self) -> SchedulerConfig {
        match self {
            Self::Pagehint => SchedulerConfig::preempt_hint(),
            Self::OnDemand | Self::Linear | Self::PagehintNoHint => SchedulerConfig::preempt(),
        }
    }

    /// Its background scans.
    pub fn scan(self) -> Scan {
        match self {
            Self::OnDemand => Scan::None,
            Self::Linear => Scan::FromStart,
            Self::PagehintNoHint | Self::Pagehint => Scan::Spaced,
        }
    }

    /// Prefetcher threads it runs when `asked` for (its scans decide).
    pub fn prefetchers(self, asked: usize) -> usize {
        match self.scan() {
            Scan::None => 0,
            Scan::FromStart => 1,
            Scan::Spaced => asked.max(1),
        }
    }

    /// Whether a restore lingers after its run until every page is loaded: not where
    /// nothing but faults loads pages (it would wait forever for pages never touched).
    pub fn lingers(self) -> bool {
        self.scan() != Scan::None
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
        assert_eq!(
            Policy::names(),
            "on-demand, linear, pagehint-nohint, pagehint"
        );
    }
}
