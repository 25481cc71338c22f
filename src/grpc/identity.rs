//! CSI Identity service: who we are, what we offer, and whether we are ready (seeded, or a
//! standby).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
use crate::csi::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

pub struct IdentityService {
    pub driver_name: String,
    pub controller: bool,
    pub ready: Arc<AtomicBool>,
    /// The controller's storage: not ready while it cannot be reached.
    pub backend: Option<Arc<dyn crate::backend::VolumeBackend>>,
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let controller = self.controller.then(|| PluginCapability {
            r#type: Some(Type::Service(Service {
                r#type: service::Type::ControllerService as i32,
            })),
        });
        // Volumes grow while in use: the backend grows, then the node refreshes the device
        // and grows the filesystem on the live mount.
        let online_expansion = PluginCapability {
            r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                r#type: volume_expansion::Type::Online as i32,
            })),
        };
        let capabilities = controller.into_iter().chain([online_expansion]).collect();
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    /// Ready when the storage can be reached and the controller is either serving attachments
    /// with its state rebuilt or a standby (a healthy standby must not be restarted); not ready
    /// while starting or seeding. Never fails.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let storage = self.backend.as_ref().is_none_or(|b| b.ready());
        Ok(Response::new(ProbeResponse {
            ready: Some(self.ready.load(Ordering::Acquire) && storage),
        }))
    }
}
