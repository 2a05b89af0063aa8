//! Pieces of the local real cluster used by e2e tests and the demo: a kubelet that runs pods as
//! local processes (work in progress) and, later, an nginx-based ingress stand-in.

pub mod container_env;
pub mod images;
pub mod ingress_render;
pub mod node;
pub mod pod_network;
pub mod pods;
