pub mod vere;
