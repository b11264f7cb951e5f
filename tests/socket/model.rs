//! A property test: random sequences of create, mount, unmount, remove and restart against a simple model of
//! what Docker should observe. Runs the real service, catalog and local backend with a recording mounter.
//! Every volume with active mounts is held by a pretend container (another mount namespace, as the
//! recording mounter models it); `StopWhileDown` stops a volume's containers while the plugin is down, so
//! their Unmounts never come and the restarted plugin must release their mount IDs itself.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use ferry::mount::{Mounter, RecordingMounter};
use ferry::service::VolumeService;

const NAMES: [&str; 3] = ["a", "b", "c"];
const IDS: [&str; 3] = ["m1", "m2", "m3"];
const OPTS: [&[(&str, &str)]; 3] = [
    &[],
    &[("size", "64M")],
    &[("size", "64M"), ("mode", "0700")],
];

#[derive(Clone, Debug)]
enum Op {
    Create(usize, usize),
    Remove(usize),
    Mount(usize, usize),
    Unmount(usize, usize),
    Restart,
    StopWhileDown(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, 0..3usize).prop_map(|(n, o)| Op::Create(n, o)),
        1 => (0..3usize).prop_map(Op::Remove),
        4 => (0..3usize, 0..3usize).prop_map(|(n, i)| Op::Mount(n, i)),
        4 => (0..3usize, 0..3usize).prop_map(|(n, i)| Op::Unmount(n, i)),
        1 => Just(Op::Restart),
        1 => (0..3usize).prop_map(Op::StopWhileDown),
    ]
}

#[derive(Default, Debug)]
struct Model {
    volumes: BTreeMap<&'static str, (usize, BTreeMap<&'static str, u32>)>,
}

async fn start(dir: &std::path::Path, mounter: &Arc<RecordingMounter>) -> Arc<VolumeService> {
    crate::start_service(dir, mounter).await
}

/// Makes the pretend containers match the model: a volume with active mounts is held elsewhere.
fn hold_in_use(dir: &std::path::Path, mounter: &RecordingMounter, model: &Model) {
    for name in NAMES {
        for file in ["disk.img", "data"] {
            mounter.release_elsewhere(&dir.join("local").join(name).join(file));
        }
    }
    for (name, (o, ids)) in &model.volumes {
        let file = if *o > 0 { "disk.img" } else { "data" };
        if !ids.is_empty() {
            mounter.hold_elsewhere(&dir.join("local").join(name).join(file));
        }
    }
}

fn options(i: usize) -> BTreeMap<String, String> {
    OPTS[i]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mounter = Arc::new(RecordingMounter::default());
    let mut svc = start(dir.path(), &mounter).await;
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Create(n, o) => {
                let r = svc.create(NAMES[n], Some(&options(o))).await;
                let want_ok = match model.volumes.get(NAMES[n]) {
                    Some((existing, _)) => *existing == o,
                    None => {
                        model.volumes.insert(NAMES[n], (o, BTreeMap::new()));
                        true
                    }
                };
                assert_eq!(r.is_ok(), want_ok, "{op:?}: {r:?}");
            }
            Op::Remove(n) => {
                let r = svc.remove(NAMES[n]).await;
                let want_ok = match model.volumes.get(NAMES[n]) {
                    Some((_, ids)) if ids.is_empty() => {
                        model.volumes.remove(NAMES[n]);
                        true
                    }
                    _ => false,
                };
                assert_eq!(r.is_ok(), want_ok, "{op:?}: {r:?}");
            }
            Op::Mount(n, i) => {
                let r = svc.mount(NAMES[n], IDS[i]).await;
                match model.volumes.get_mut(NAMES[n]) {
                    Some((_, ids)) => {
                        assert!(r.is_ok(), "{op:?}: {r:?}");
                        *ids.entry(IDS[i]).or_default() += 1;
                    }
                    None => assert!(r.is_err()),
                }
            }
            Op::Unmount(n, i) => {
                let r = svc.unmount(NAMES[n], IDS[i]).await;
                match model.volumes.get_mut(NAMES[n]) {
                    Some((_, ids)) => {
                        assert!(r.is_ok(), "{op:?}: {r:?}");
                        if let Some(c) = ids.get_mut(IDS[i]) {
                            *c -= 1;
                            if *c == 0 {
                                ids.remove(IDS[i]);
                            }
                        }
                    }
                    None => assert!(r.is_err()),
                }
            }
            Op::Restart => {
                drop(svc);
                svc = start(dir.path(), &mounter).await;
            }
            Op::StopWhileDown(n) => {
                drop(svc);
                if let Some((_, ids)) = model.volumes.get_mut(NAMES[n]) {
                    ids.clear();
                }
                hold_in_use(dir.path(), &mounter, &model);
                svc = start(dir.path(), &mounter).await;
            }
        }
        hold_in_use(dir.path(), &mounter, &model);
        // Docker's view agrees with the model, and sized volumes are mounted exactly while in use.
        let listed: Vec<_> = svc.list().into_iter().map(|v| v.name).collect();
        let want: Vec<_> = model.volumes.keys().map(|s| s.to_string()).collect();
        assert_eq!(listed, want);
        let table = mounter.mount_table().unwrap();
        for (name, (o, ids)) in &model.volumes {
            let info = svc.get(name).unwrap();
            let active: u32 = ids.values().sum();
            assert_eq!(info.status["active_mounts"], active, "{name}");
            assert_eq!(info.mountpoint.is_some(), active > 0, "{name}");
            let data = dir.path().join("local").join(name).join("data");
            if *o > 0 {
                assert_eq!(table.is_mounted(&data), active > 0, "{name}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn service_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(run(ops));
    }
}
