//! Pure twin core. (being written)
