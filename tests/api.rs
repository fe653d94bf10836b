//! The library as a native app uses it: a wgpu device the app created itself handed in, one
//! model shared by sessions on several threads, cancellation from another thread.

use longwave::{GenerateOptions, Gpu, Model, Session, SessionOptions, StopReason};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn model_path() -> std::path::PathBuf {
    let p = std::env::var_os("LONGWAVE_TEST_MODEL").map(Into::into).unwrap_or_else(longwave::model::default_model_path);
    assert!(p.is_file(), "default model missing at {}: run models/fetch_default.sh", p.display());
    p
}

/// A device created the way an app's renderer would, with no longwave involvement.
fn app_device() -> Arc<Gpu> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions::default())).unwrap();
    // Only the WebGPU defaults: no f16, no subgroups, small bindings; the fallbacks must serve.
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor::default())).unwrap();
    Gpu::from_device(device, queue, adapter.get_info())
}

#[test]
fn app_owned_device_shared_model_and_cancellation() {
    let gpu = app_device();
    assert!(!gpu.caps.f16 && !gpu.caps.subgroups);
    let model = Model::load_on(gpu, model_path(), &mut |_, _| {}).unwrap();
    let messages = longwave::user_message("What is the capital of France?");
    let greedy = GenerateOptions { max_tokens: 12, ..Default::default() };

    // Sessions on two threads share the model.
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let model = model.clone();
            let (messages, greedy) = (messages.clone(), greedy.clone());
            std::thread::spawn(move || {
                let mut s = Session::new(&model, &SessionOptions { max_ctx: Some(256) }).unwrap();
                s.chat(&messages, &greedy, |_| true).unwrap().0
            })
        })
        .collect();
    let replies: Vec<String> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(replies[0].contains("Paris"), "{replies:?}");
    assert_eq!(replies[0], replies[1]);

    // Cancellation from another thread: it sets the flag once the first token arrives.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let canceller = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            rx.recv().unwrap();
            stop.store(true, Ordering::Relaxed);
        })
    };
    let mut s = Session::new(&model, &SessionOptions { max_ctx: Some(256) }).unwrap();
    let opts = GenerateOptions { max_tokens: 200, stop_at_eos: false, stop: Some(stop), ..Default::default() };
    let mut sent = false;
    let (out, stats) = s
        .chat(&messages, &opts, |_| {
            if !sent {
                tx.send(()).unwrap();
                sent = true;
                // Give the other thread time to set the flag before the next check.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            true
        })
        .unwrap();
    canceller.join().unwrap();
    assert_eq!(stats.stop, StopReason::Cancelled);
    assert!(stats.generated_tokens < 200, "{out:?}");
    assert_eq!(s.kv_usage().gpu_bytes, s.kv_bytes());

    // A stop that is already set ends a long prompt's prefill after its first chunk; the cache
    // keeps what was computed.
    let mut s = Session::new(&model, &SessionOptions { max_ctx: Some(1024) }).unwrap();
    let long: Vec<u32> = (0..600).map(|i| 1000 + i % 500).collect();
    let opts = GenerateOptions { stop: Some(Arc::new(AtomicBool::new(true))), ..Default::default() };
    let (out, stats) = s.generate(&long, &opts, |_, _| true).unwrap();
    assert_eq!(stats.stop, StopReason::Cancelled);
    assert!(out.is_empty());
    assert!(stats.prefilled_tokens > 0 && stats.prefilled_tokens < long.len(), "{stats:?}");
    assert_eq!(s.context_len(), stats.prefilled_tokens);
    assert!(s.context_len() > 0 && s.context_len() <= s.max_ctx());
}
