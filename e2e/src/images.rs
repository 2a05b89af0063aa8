//! Which local binary runs a container image. The local kubelet has no container runtime: an
//! image whose repository's last path segment is a known name runs the matching workspace
//! binary, whatever the registry and tag (`ghcr.io/acme/embedroll-embedder:v2` →
//! `target/release/embedder`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct ImageMap {
    binaries: BTreeMap<String, PathBuf>,
}

impl ImageMap {
    /// The workspace's own images, served from the binaries in `bin_dir`.
    pub fn workspace(bin_dir: &Path) -> Self {
        let mut map = Self::default();
        map.insert("embedroll-embedder", bin_dir.join("embedder"));
        map.insert("embedroll-operator", bin_dir.join("embedroll-operator"));
        map
    }

    pub fn insert(&mut self, repository_name: &str, binary: PathBuf) {
        self.binaries.insert(repository_name.to_string(), binary);
    }

    /// Parses `NAME=PATH` as given on the command line.
    pub fn insert_spec(&mut self, spec: &str) -> Result<(), String> {
        let (name, path) = spec
            .split_once('=')
            .filter(|(n, p)| !n.is_empty() && !p.is_empty())
            .ok_or_else(|| format!("image mapping {spec:?} must look like NAME=PATH"))?;
        self.insert(name, PathBuf::from(path));
        Ok(())
    }

    /// The binary for `image`, or why there is none.
    pub fn resolve(&self, image: &str) -> Result<&Path, String> {
        let name = repository_name(image);
        self.binaries
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| {
                format!(
                    "image {image:?} (repository name {name:?}) maps to no local binary; known: {}",
                    self.binaries.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            })
    }
}

/// The last path segment of an image reference, without tag or digest.
pub fn repository_name(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_name_ignores_registry_tag_and_digest() {
        for image in [
            "embedroll-embedder",
            "embedroll-embedder:v1",
            "ghcr.io/acme/embedroll-embedder:1.2.3",
            "localhost:5000/embedroll-embedder",
            "registry:5000/team/embedroll-embedder@sha256:abcd",
            "registry:5000/team/embedroll-embedder:v2@sha256:abcd",
        ] {
            assert_eq!(repository_name(image), "embedroll-embedder", "{image}");
        }
    }

    #[test]
    fn unknown_images_are_explained() {
        let map = ImageMap::workspace(Path::new("/bin-dir"));
        assert_eq!(
            map.resolve("x.io/embedroll-embedder:v3").unwrap(),
            Path::new("/bin-dir/embedder")
        );
        let err = map.resolve("nginx:1.27").unwrap_err();
        assert!(
            err.contains("nginx") && err.contains("embedroll-embedder"),
            "{err}"
        );
        let mut map = map;
        assert!(map.insert_spec("busybox").is_err());
        map.insert_spec("busybox=/bin/busybox").unwrap();
        assert_eq!(
            map.resolve("busybox:latest").unwrap(),
            Path::new("/bin/busybox")
        );
    }
}
