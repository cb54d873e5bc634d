pub mod mount;
pub mod vere;
