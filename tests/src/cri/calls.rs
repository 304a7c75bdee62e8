//! The CRI calls a test makes, one method each: pods, containers, ExecSync, statuses.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusResponse,
};

use super::{CALL_LIMIT, Cri, CriError, Exec, Handler, Pod, api, host, image_spec};
use crate::engines::IMAGE;

impl Cri {
    /// RunPodSandbox: a pod named `name` under `handler`, in the pod network, with its own
    /// cgroup parent and log directory, and the namespace options kubelet gives (network and
    /// IPC shared by the pod, a pid namespace per container); then PodSandboxStatus for its IP.
    pub fn run_pod(&self, name: &str, handler: Handler) -> Result<Pod, CriError> {
        let n = self.pods_made.fetch_add(1, Ordering::Relaxed);
        let log_dir = self.dir().join("logs").join(format!("{name}-{n}"));
        std::fs::create_dir_all(&log_dir).expect("creating the pod's log directory");
        let cgroup_parent = format!("{}/{name}-{n}", self.cgroup);
        host::make_pod_cgroup(&cgroup_parent, super::POD_MEMORY_LIMIT);
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("{name}-{}-{n}", std::process::id()),
                namespace: "husk-test".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent,
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let what = format!("RunPodSandbox({name}, handler {})", handler.name());
        let mut c = self.runtime.clone();
        let request = api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.name().into(),
        };
        let id = self
            .call(what.clone(), CALL_LIMIT, async move {
                c.run_pod_sandbox(request).await
            })?
            .pod_sandbox_id;
        let status = self.pod_status_verbose(&id)?;
        let pid = self.remember(&status.info, format!("pod {name}'s sandbox"));
        let ip = status
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default();
        let ip = ip.parse().map_err(|_| {
            self.error(
                what,
                tonic::Code::Internal,
                format!("pod {id} has no IP in PodSandboxStatus ({ip:?})"),
            )
        })?;
        Ok(Pod {
            id,
            name: name.into(),
            handler,
            ip,
            config,
            log_dir,
            pid,
        })
    }

    /// PodSandboxStatus (verbose: `info` holds containerd's JSON, with the sandbox's pid).
    pub fn pod_status_verbose(&self, id: &str) -> Result<PodSandboxStatusResponse, CriError> {
        let mut c = self.runtime.clone();
        let id = id.to_string();
        self.call(format!("PodSandboxStatus({id})"), CALL_LIMIT, async move {
            c.pod_sandbox_status(api::PodSandboxStatusRequest {
                pod_sandbox_id: id,
                verbose: true,
            })
            .await
        })
    }

    /// PodSandboxStatus of `pod`.
    pub fn pod_status(&self, pod: &Pod) -> Result<api::PodSandboxStatus, CriError> {
        let status = self.pod_status_verbose(&pod.id)?;
        status.status.ok_or_else(|| {
            self.error(
                format!("PodSandboxStatus({})", pod.name),
                tonic::Code::Internal,
                "no status in the reply".into(),
            )
        })
    }

    /// StopPodSandbox: stops every container of `pod` and tears its network down.
    pub fn stop_pod(&self, pod: &Pod) -> Result<(), CriError> {
        self.stop_pod_id(&pod.id, &pod.name)
    }

    pub(super) fn stop_pod_id(&self, id: &str, name: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = api::StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(format!("StopPodSandbox({name})"), CALL_LIMIT, async move {
            c.stop_pod_sandbox(request).await
        })
        .map(drop)
    }

    /// RemovePodSandbox: removes `pod` and its containers.
    pub fn remove_pod(&self, pod: &Pod) -> Result<(), CriError> {
        self.remove_pod_id(&pod.id, &pod.name)
    }

    pub(super) fn remove_pod_id(&self, id: &str, name: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = api::RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call(
            format!("RemovePodSandbox({name})"),
            CALL_LIMIT,
            async move { c.remove_pod_sandbox(request).await },
        )
        .map(drop)
    }

    /// ListPodSandbox: every pod containerd knows.
    pub fn list_pods(&self) -> Result<Vec<api::PodSandbox>, CriError> {
        let mut c = self.runtime.clone();
        self.call("ListPodSandbox".into(), CALL_LIMIT, async move {
            c.list_pod_sandbox(api::ListPodSandboxRequest { filter: None })
                .await
        })
        .map(|r| r.items)
    }

    /// ListContainers: every container containerd knows.
    pub fn list_containers(&self) -> Result<Vec<api::Container>, CriError> {
        let mut c = self.runtime.clone();
        self.call("ListContainers".into(), CALL_LIMIT, async move {
            c.list_containers(api::ListContainersRequest { filter: None })
                .await
        })
        .map(|r| r.containers)
    }

    /// A container configuration as kubelet makes one: `name` from the test image running
    /// `command`, logging to `<name>.log` in the pod's log directory, in the pod's network
    /// and IPC namespaces and a pid namespace of its own. Change what a test needs before
    /// [`Cri::create_container`].
    pub fn container_config(&self, name: &str, command: &[&str]) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(image_spec(IMAGE)),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                resources: None,
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(namespace_options()),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }

    /// CreateContainer in `pod`; the container's id.
    pub fn create_container(&self, pod: &Pod, config: ContainerConfig) -> Result<String, CriError> {
        let name = config
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        let mut c = self.runtime.clone();
        let request = api::CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        self.call(
            format!("CreateContainer({name} in pod {})", pod.name),
            CALL_LIMIT,
            async move { c.create_container(request).await },
        )
        .map(|r| r.container_id)
    }

    /// The host pid of container `id` (ContainerStatus's verbose info): with husk, the
    /// process that stands for it (a pod's later container) or its VM's monitor.
    pub fn container_pid(&self, id: &str) -> Result<Option<u32>, CriError> {
        let status = self.container_status_verbose(id)?;
        Ok(super::info_pid(&status.info))
    }

    /// StartContainer; the container's pid is remembered for [`Cri::leftovers`].
    pub fn start_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = api::StartContainerRequest {
            container_id: id.into(),
        };
        self.call(format!("StartContainer({id})"), CALL_LIMIT, async move {
            c.start_container(request).await
        })?;
        let status = self.container_status_verbose(id)?;
        self.remember(&status.info, format!("container {id}"));
        Ok(())
    }

    /// CreateContainer ([`Cri::container_config`]) and StartContainer: `name` running
    /// `command` in `pod`; its id.
    pub fn run_container(
        &self,
        pod: &Pod,
        name: &str,
        command: &[&str],
    ) -> Result<String, CriError> {
        let id = self.create_container(pod, self.container_config(name, command))?;
        self.start_container(&id)?;
        Ok(id)
    }

    /// ExecSync: `cmd` in container `id`, killed after `timeout`.
    pub fn exec_sync(&self, id: &str, cmd: &[&str], timeout: Duration) -> Result<Exec, CriError> {
        let mut c = self.runtime.clone();
        let request = api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        };
        self.call(
            format!("ExecSync({id}, {cmd:?})"),
            timeout + Duration::from_secs(60),
            async move { c.exec_sync(request).await },
        )
        .map(|r| Exec {
            stdout: String::from_utf8_lossy(&r.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&r.stderr).into_owned(),
            exit_code: r.exit_code,
        })
    }

    /// ExecSync of `cmd` in `id`, again until it exits 0 or `limit` passes (for what a
    /// container is still starting, as a server that does not listen yet).
    pub fn exec_until_ok(&self, id: &str, cmd: &[&str], limit: Duration) -> Result<Exec, CriError> {
        let deadline = Instant::now() + limit;
        loop {
            let exec = self.exec_sync(id, cmd, Duration::from_secs(30))?;
            if exec.exit_code == 0 {
                return Ok(exec);
            }
            if Instant::now() > deadline {
                return Err(self.error(
                    format!("ExecSync({id}, {cmd:?})"),
                    tonic::Code::DeadlineExceeded,
                    format!("still failing after {} s: {exec:?}", limit.as_secs()),
                ));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// ContainerStatus of `id`.
    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, CriError> {
        let status = self.container_status_verbose(id)?;
        status.status.ok_or_else(|| {
            self.error(
                format!("ContainerStatus({id})"),
                tonic::Code::Internal,
                "no status in the reply".into(),
            )
        })
    }

    /// ContainerStatus (verbose: `info` holds containerd's JSON, with the container's pid).
    pub fn container_status_verbose(
        &self,
        id: &str,
    ) -> Result<api::ContainerStatusResponse, CriError> {
        let mut c = self.runtime.clone();
        let request = api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: true,
        };
        self.call(format!("ContainerStatus({id})"), CALL_LIMIT, async move {
            c.container_status(request).await
        })
    }

    /// ContainerStatus of `id`, again until its state is `state` (or `limit` passes).
    pub fn wait_container_state(
        &self,
        id: &str,
        state: ContainerState,
        limit: Duration,
    ) -> Result<ContainerStatus, CriError> {
        let deadline = Instant::now() + limit;
        loop {
            let status = self.container_status(id)?;
            if status.state == state as i32 {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(self.error(
                    format!("ContainerStatus({id})"),
                    tonic::Code::DeadlineExceeded,
                    format!(
                        "not {state:?} after {} s: {:?} ({} {})",
                        limit.as_secs(),
                        ContainerState::try_from(status.state),
                        status.reason,
                        status.message
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// StopContainer: SIGTERM, then SIGKILL after `grace`.
    pub fn stop_container(&self, id: &str, grace: Duration) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = api::StopContainerRequest {
            container_id: id.into(),
            timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
        };
        self.call(
            format!("StopContainer({id})"),
            CALL_LIMIT + grace,
            async move { c.stop_container(request).await },
        )
        .map(drop)
    }

    /// RemoveContainer.
    pub fn remove_container(&self, id: &str) -> Result<(), CriError> {
        let mut c = self.runtime.clone();
        let request = api::RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call(format!("RemoveContainer({id})"), CALL_LIMIT, async move {
            c.remove_container(request).await
        })
        .map(drop)
    }

    /// What container `name` of `pod` wrote (the CRI log file: a line per write, each
    /// `TIME STREAM TAG text`).
    pub fn container_log(&self, pod: &Pod, name: &str) -> String {
        std::fs::read_to_string(pod.log_dir.join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// kubelet's namespace options for a pod and its containers: network and IPC per pod, pid per
/// container.
pub(super) fn namespace_options() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}
