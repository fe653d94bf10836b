//! A terminal chat in a dozen lines of library use:
//! `cargo run --release --example chat [MODEL]` (default: the default model).

use longwave::{ChatMessage, GenerateOptions, GpuOptions, Model, Session, SessionOptions};
use std::io::{BufRead, Write};

fn main() -> Result<(), longwave::Error> {
    let path = std::env::args().nth(1).map(Into::into).unwrap_or_else(longwave::model::default_model_path);
    let model = Model::load(&path, &GpuOptions::default())?;
    let mut session = Session::new(&model, &SessionOptions::default())?;
    let mut messages = vec![];
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| longwave::Error::Other(e.to_string()))?;
        messages.push(ChatMessage::new("user", line));
        let (reply, _) = session.chat(&messages, &GenerateOptions::default(), |text| {
            print!("{text}");
            std::io::stdout().flush().is_ok()
        })?;
        println!();
        messages.push(ChatMessage::new("assistant", reply));
    }
    Ok(())
}
