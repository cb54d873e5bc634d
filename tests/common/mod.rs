pub mod vere;
pub mod mount;
