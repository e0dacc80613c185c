#![forbid(unsafe_code)]

pub mod assign;
