//! The settings as earlier versions named them: everything here is
//! [`crate::config`], re-exported so `floodgate::settings::Settings` keeps
//! working.

pub use crate::config::*;
