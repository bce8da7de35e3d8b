//! Layered configuration for every pushfleet binary: a TOML file, then environment variables,
//! then command-line flags, each overriding the one before. The clap definition is the single
//! source of names, defaults and `--help` text; the file's keys are the flags' long names with
//! `_` or `-` (e.g. `max_topic_bytes = 256` for `--max-topic-bytes`).

use clap::parser::ValueSource;
use clap::Parser;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why the configuration could not be loaded.
#[derive(Debug, Error)]
pub enum LayeredError {
    /// The flags themselves are wrong (also `--help` and `--version`, which clap prints).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// The TOML file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file named by `--config`.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML file is not valid TOML.
    #[error("config file {path} is not valid TOML: {source}")]
    Toml {
        /// The file named by `--config`.
        path: PathBuf,
        /// The parse error.
        source: toml::de::Error,
    },
    /// A key or value in the file does not fit a flag.
    #[error("config file {path}: {message}")]
    Key {
        /// The file named by `--config`.
        path: PathBuf,
        /// Which key, and what is wrong with it.
        message: String,
    },
}

/// Parses `T` from the process arguments and environment, reading the TOML file named by the
/// flag whose id is `config_id` (usually `config`) when it is given.
pub fn parse<T: Parser>(config_id: &str) -> Result<T, LayeredError> {
    parse_from(std::env::args_os(), config_id)
}

/// As [`parse`], from explicit arguments (the first is the program name).
pub fn parse_from<T: Parser, I>(args: I, config_id: &str) -> Result<T, LayeredError>
where
    I: IntoIterator,
    I::Item: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let command = T::command();
    let first = command.clone().try_get_matches_from(&args)?;
    let Some(path) = first.get_one::<PathBuf>(config_id).cloned() else {
        return Ok(T::from_arg_matches(&first)?);
    };
    let from_file = file_arguments(&command, &first, &path)?;
    let mut merged = Vec::with_capacity(args.len() + from_file.len());
    merged.extend(args.first().cloned());
    merged.extend(from_file);
    merged.extend(args.into_iter().skip(1));
    Ok(T::try_parse_from(merged)?)
}

/// Turns the file's keys into `--flag=value` arguments for flags not set by env or CLI.
fn file_arguments(
    command: &clap::Command,
    given: &clap::ArgMatches,
    path: &Path,
) -> Result<Vec<OsString>, LayeredError> {
    let text = std::fs::read_to_string(path).map_err(|source| LayeredError::Read {
        path: path.into(),
        source,
    })?;
    let table: toml::Table = toml::from_str(&text).map_err(|source| LayeredError::Toml {
        path: path.into(),
        source,
    })?;
    let key_error = |message: String| LayeredError::Key {
        path: path.into(),
        message,
    };
    let mut out = Vec::new();
    for (key, value) in table {
        let long = key.replace('_', "-");
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()))
            .ok_or_else(|| key_error(format!("unknown key `{key}` (see --help)")))?;
        let set_elsewhere = matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if set_elsewhere {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let values = match value {
            toml::Value::Array(items) => items,
            single => vec![single],
        };
        for item in values {
            let text = match item {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if !takes_value => {
                    if b {
                        out.push(format!("--{long}").into());
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(key_error(format!(
                        "key `{key}` has a {} value; expected a string, number or boolean",
                        other.type_str()
                    )))
                }
            };
            if !takes_value {
                return Err(key_error(format!(
                    "key `{key}` is a switch: use true/false"
                )));
            }
            out.push(format!("--{long}={text}").into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Parser, Debug)]
    struct Demo {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long, default_value_t = 10)]
        limit: u32,
        #[arg(long, env = "PUSHFLEET_LAYERED_TEST_NAME", default_value = "dflt")]
        name: String,
        #[arg(long)]
        endpoint: Vec<String>,
        #[arg(long)]
        verbose: bool,
    }

    fn file(text: &str) -> tempfile_path::TempPath {
        tempfile_path::TempPath::with(text)
    }

    mod tempfile_path {
        use super::*;
        pub struct TempPath(pub PathBuf);
        impl TempPath {
            pub fn with(text: &str) -> Self {
                let n = std::process::id() as u64 * 1000
                    + std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .subsec_nanos() as u64;
                let p = std::env::temp_dir().join(format!("pushfleet-layered-{n}.toml"));
                std::fs::File::create(&p)
                    .unwrap()
                    .write_all(text.as_bytes())
                    .unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn parse_args(args: &[&str]) -> Result<Demo, LayeredError> {
        parse_from(
            std::iter::once("demo").chain(args.iter().copied()),
            "config",
        )
    }

    #[test]
    fn file_sets_values_and_cli_overrides_them() {
        let f = file("limit = 5\nendpoint = [\"a\", \"b\"]\nverbose = true\n");
        let p = f.0.to_str().unwrap();
        let d = parse_args(&["--config", p]).unwrap();
        assert_eq!(d.limit, 5);
        assert_eq!(d.endpoint, vec!["a", "b"]);
        assert!(d.verbose);
        let d = parse_args(&["--config", p, "--limit", "7"]).unwrap();
        assert_eq!(d.limit, 7);
    }

    #[test]
    fn without_a_file_defaults_apply() {
        let d = parse_args(&[]).unwrap();
        assert_eq!(d.limit, 10);
        assert_eq!(d.name, "dflt");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let f = file("limitt = 5\n");
        let e = parse_args(&["--config", f.0.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("unknown key `limitt`"), "{e}");
        let f = file("limit = \"many\"\n");
        let e = parse_args(&["--config", f.0.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("many"), "{e}");
        let f = file("limit = { a = 1 }\n");
        let e = parse_args(&["--config", f.0.to_str().unwrap()]).unwrap_err();
        assert!(e.to_string().contains("key `limit`"), "{e}");
        let e = parse_args(&["--config", "/nonexistent/x.toml"]).unwrap_err();
        assert!(matches!(e, LayeredError::Read { .. }));
    }
}
