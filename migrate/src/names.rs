//! Enums with one name on the command line and one code on the wire.

/// Defines an enum whose every value has a command-line name and a wire code: `ALL`,
/// `name`, `code`, checked `from_code`, `Display` and `FromStr` (an unknown name is an error
/// that lists the known ones).
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident = $code:literal, $s:literal;)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)+
        }

        impl $name {
            /// Every value, in table order.
            pub const ALL: &'static [Self] = &[$(Self::$v),+];

            /// The command-line name.
            pub fn name(self) -> &'static str {
                match self { $(Self::$v => $s,)+ }
            }

            /// The wire code.
            pub fn code(self) -> u64 {
                match self { $(Self::$v => $code,)+ }
            }

            /// From a wire code.
            pub fn from_code(c: u64) -> Option<Self> {
                match c { $($code => Some(Self::$v),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.iter().copied().find(|v| v.name() == s).ok_or_else(|| {
                    let names: Vec<_> = Self::ALL.iter().map(|v| v.name()).collect();
                    format!("unknown {} {s:?} ({})", $what, names.join(", "))
                })
            }
        }
    };
}

pub(crate) use named_enum;
