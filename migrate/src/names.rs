//! Enums with one code on the wire (or in the guest's status page), and those that also
//! have one name on the command line: the one macro every code enum of the crate is
//! declared with.

/// Defines an enum whose every value has a wire code of type `$repr` (its discriminant):
/// `ALL`, `code` and a checked `from_code` (an unknown code is `None`, never a panic).
macro_rules! code_enum {
    ($(#[$m:meta])* $vis:vis enum $name:ident: $repr:ident {
        $($(#[$vm:meta])* $v:ident = $code:literal,)+
    }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr($repr)]
        $vis enum $name {
            $($(#[$vm])* $v = $code,)+
        }

        impl $name {
            /// Every value, in table order.
            pub const ALL: &'static [Self] = &[$(Self::$v),+];

            /// The wire code.
            pub const fn code(self) -> $repr {
                self as $repr
            }

            /// From a wire code.
            pub fn from_code(c: $repr) -> Option<Self> {
                match c {
                    $($code => Some(Self::$v),)+
                    _ => None,
                }
            }
        }
    };
}

/// `$first` and the `$rest`, joined with `$sep`, as one literal.
macro_rules! joined {
    ($sep:literal; $first:literal $(, $rest:literal)*) => {
        concat!($first $(, $sep, $rest)*)
    };
}

/// Defines a [`code_enum!`] (`u64` codes) whose every value also has a command-line name:
/// `name`, `NAMES` and `LIST` (for help texts and defaults), `Display` and `FromStr` (an
/// unknown name is an error that lists the known ones).
macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident, $what:literal { $($(#[$vm:meta])* $v:ident = $code:literal, $s:literal;)+ }) => {
        $crate::names::code_enum!(
            $(#[$m])*
            pub enum $name: u64 {
                $($(#[$vm])* $v = $code,)+
            }
        );

        impl $name {
            /// Every name, in table order, for help texts: `a, b, c`.
            pub const NAMES: &'static str = $crate::names::joined!(", "; $($s),+);
            /// Every name as a comma-separated list (a default that selects every value).
            pub const LIST: &'static str = $crate::names::joined!(","; $($s),+);

            /// The command-line name.
            pub fn name(self) -> &'static str {
                match self { $(Self::$v => $s,)+ }
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

pub(crate) use {code_enum, joined, named_enum};
