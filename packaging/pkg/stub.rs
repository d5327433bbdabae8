//! Nothing to build: this manifest only carries the .deb metadata (see Cargo.toml).
