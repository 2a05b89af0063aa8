//! The controller's caches of its children: for each live Deployment, Service and Ingress the
//! operator owns, the fields it owns ([`crate::owned`]) as compact JSON.
//!
//! kube's reflector keeps each object as its typed struct, and a k8s-openapi struct is mostly
//! empty `Option`s and small maps (a `BTreeMap` takes a 500-byte node for two labels): about
//! 2 KB for a Service. At 5,000 rollouts (seven children each) those caches were most of the
//! operator's memory. The bytes of the projected object are about a fifth of that; a reconcile
//! reads a handful of children and decodes them on the way.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Resource;
use kube::ResourceExt;
use kube::runtime::watcher;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// `namespace/name` → the object as JSON.
type Objects = HashMap<Box<str>, Box<[u8]>>;

/// One kind's cache, filled from a watch's events.
pub struct ChildCache<K> {
    objects: RwLock<Objects>,
    /// The objects of a relist in progress; they replace `objects` when it is complete.
    relist: RwLock<Option<Objects>>,
    /// A complete list has been seen: before that, a missing child may only be not listed yet.
    ready: AtomicBool,
    kind: PhantomData<fn() -> K>,
}

impl<K> Default for ChildCache<K> {
    fn default() -> Self {
        Self {
            objects: RwLock::default(),
            relist: RwLock::default(),
            ready: AtomicBool::new(false),
            kind: PhantomData,
        }
    }
}

fn key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into_boxed_str()
}

impl<K> ChildCache<K>
where
    K: Resource + Serialize + DeserializeOwned,
{
    /// Takes one watch event in, as kube's reflector does (a relist replaces the whole set
    /// once it is complete, so a child deleted while the watch was down disappears).
    pub fn apply(&self, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Apply(object) => {
                if let Some((key, bytes)) = encode(object) {
                    write(&self.objects).insert(key, bytes);
                }
            }
            watcher::Event::Delete(object) => {
                let key = key(&object.namespace().unwrap_or_default(), &object.name_any());
                write(&self.objects).remove(&key);
            }
            watcher::Event::Init => *write(&self.relist) = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                if let (Some(relist), Some((key, bytes))) =
                    (write(&self.relist).as_mut(), encode(object))
                {
                    relist.insert(key, bytes);
                }
            }
            watcher::Event::InitDone => {
                if let Some(mut complete) = write(&self.relist).take() {
                    complete.shrink_to_fit();
                    *write(&self.objects) = complete;
                }
                self.ready.store(true, Ordering::Release);
            }
        }
    }

    /// The cached child `namespace/name`, decoded.
    pub fn get(&self, namespace: &str, name: &str) -> Option<K> {
        let objects = self.objects.read().unwrap_or_else(|e| e.into_inner());
        let bytes = objects.get(&key(namespace, name))?;
        serde_json::from_slice(bytes).ok()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn len(&self) -> usize {
        self.objects.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn encode<K: Resource + Serialize>(object: &K) -> Option<(Box<str>, Box<[u8]>)> {
    let bytes = serde_json::to_vec(object).ok()?;
    Some((
        key(&object.namespace().unwrap_or_default(), &object.name_any()),
        bytes.into_boxed_slice(),
    ))
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::ObjectMeta;

    fn service(name: &str, selector: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some("ml".to_owned()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                selector: Some([("color".to_owned(), selector.to_owned())].into()),
                ..Default::default()
            }),
            ..Service::default()
        }
    }

    #[test]
    fn follows_applies_deletes_and_relists() {
        let cache = ChildCache::<Service>::default();
        assert!(!cache.is_ready());
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(service("a", "blue")));
        cache.apply(&watcher::Event::InitApply(service("b", "blue")));
        assert!(
            cache.get("ml", "a").is_none(),
            "a relist shows once complete"
        );
        cache.apply(&watcher::Event::InitDone);
        assert!(cache.is_ready());
        assert_eq!(cache.get("ml", "a"), Some(service("a", "blue")));

        cache.apply(&watcher::Event::Apply(service("a", "green")));
        assert_eq!(cache.get("ml", "a"), Some(service("a", "green")));
        cache.apply(&watcher::Event::Delete(service("b", "blue")));
        assert_eq!(cache.get("ml", "b"), None);
        assert_eq!(cache.get("other", "a"), None);

        // After a watch outage, a relist without `a` drops it.
        cache.apply(&watcher::Event::Init);
        cache.apply(&watcher::Event::InitApply(service("c", "blue")));
        cache.apply(&watcher::Event::InitDone);
        assert_eq!(cache.get("ml", "a"), None);
        assert_eq!(cache.len(), 1);
    }
}
