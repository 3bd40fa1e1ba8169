//! `seawall`: check, explain and describe seawall plugin configs, natively, with the filter's own
//! config compiler and engine (the core crate without its proxy-wasm glue), so that what the tool
//! accepts is exactly what the filter accepts.
//!
//! Exit codes (documented in the README and in `--help`):
//! - 0: every plugin config found loads (warnings allowed, unless `--strict`);
//! - 1: a plugin config is refused (or, with `--strict`, warned about);
//! - 2: the tool could not do its job: bad arguments, an unreadable file, no plugin config in it.
//!
//! Output follows the usual conventions: results on stdout, diagnostics (errors, warnings) on
//! stderr, `--format json` for machines (one JSON document on stdout), colour only on a terminal
//! (and never with `NO_COLOR` set).

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use seawall_cli::output::{self, Format, Style};
use seawall_cli::{check, explain, input};

const EXIT_OK: u8 = 0;
const EXIT_REFUSED: u8 = 1;
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(
    name = "seawall",
    version,
    about = "Check and explain seawall plugin configs with the filter's own code",
    after_help = "Exit codes: 0 every config loads (warnings allowed unless --strict); 1 a config is refused (or warned about, with --strict); 2 bad arguments, unreadable input, or no plugin config found."
)]
struct Cli {
    /// Output for people (default) or one JSON document for machines.
    #[arg(long, global = true, value_enum, default_value_t = Format::Human)]
    format: Format,
    /// Colour: only on a terminal (auto), always, or never. NO_COLOR turns auto off.
    #[arg(long, global = true, value_enum, default_value_t = ColorChoice::Auto)]
    color: ColorChoice,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Subcommand)]
enum Command {
    /// Check every seawall plugin config in FILE: plugin JSON, an Envoy bootstrap/LDS/ECDS file,
    /// or an Istio WasmPlugin ("-" reads standard input).
    Check {
        /// The file to check; "-" for standard input.
        file: String,
        /// Fail (exit 1) on warnings too.
        #[arg(long)]
        strict: bool,
    },
    /// Show which route a request matches and what each policy would decide on fresh state.
    Explain(Box<ExplainArgs>),
    /// Print the JSON Schema of the plugin config (also at envoy/seawall.schema.json).
    Schema,
}

#[derive(Args)]
struct ExplainArgs {
    /// The file holding the plugin config (any kind `check` reads); "-" for standard input.
    file: String,
    /// The request's method.
    #[arg(long, short = 'X', default_value = "GET")]
    method: String,
    /// The request's path, with its query string if any.
    #[arg(long, default_value = "/")]
    path: String,
    /// A request header, "name: value" (repeatable). "host" sets the authority.
    #[arg(long = "header", short = 'H', value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// The request's :authority.
    #[arg(long)]
    authority: Option<String>,
    /// The Envoy route name the request is on (xds.route_name), for routes that match it.
    #[arg(long)]
    route_name: Option<String>,
    /// The upstream cluster Envoy picked (xds.cluster_name).
    #[arg(long)]
    cluster: Option<String>,
    /// The client's address (source.address).
    #[arg(long)]
    client_ip: Option<String>,
    /// The time to decide at, RFC 3339 (default: now); fault time boxes depend on it.
    #[arg(long)]
    at: Option<String>,
    /// Which config, when FILE holds several (1 is the first, in the order check lists them).
    #[arg(long = "config", value_name = "N")]
    config_index: Option<usize>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let style = Style::new(match cli.color {
        ColorChoice::Always => Some(true),
        ColorChoice::Never => Some(false),
        ColorChoice::Auto => None,
    });
    let code = match cli.command {
        Command::Schema => schema(),
        Command::Check { file, strict } => run_check(&file, strict, cli.format, &style),
        Command::Explain(args) => run_explain(*args, cli.format, &style),
    };
    ExitCode::from(code)
}

fn schema() -> u8 {
    let schema = seawall::config::schema::plugin_config_schema();
    match serde_json::to_string_pretty(&schema) {
        Ok(text) => {
            seawall_cli::out!("{text}");
            EXIT_OK
        }
        Err(error) => {
            eprintln!("seawall: {error}");
            EXIT_USAGE
        }
    }
}

fn load_input(file: &str) -> Result<input::Input, u8> {
    input::read(file)
        .and_then(|text| input::find(&text))
        .map_err(|error| {
            eprintln!("seawall: {error}");
            EXIT_USAGE
        })
}

fn run_check(file: &str, strict: bool, format: Format, style: &Style) -> u8 {
    let input = match load_input(file) {
        Ok(input) => input,
        Err(code) => return code,
    };
    let checked: Vec<check::Checked> = input.configs.into_iter().map(check::check).collect();
    let file = if file == "-" { "<stdin>" } else { file };
    let refused = checked.iter().any(|c| c.result.is_err());
    let warned = checked.iter().any(|c| !c.warnings.is_empty());
    match format {
        Format::Json => output::check_json(file, &checked, &input.notes),
        Format::Human => output::check_human(file, &checked, &input.notes, style),
    }
    if refused || (strict && warned) {
        EXIT_REFUSED
    } else {
        EXIT_OK
    }
}

impl ExplainArgs {
    fn spec(&self) -> Result<explain::RequestSpec, String> {
        let mut headers = Vec::new();
        let mut authority = self.authority.clone();
        for header in &self.headers {
            let Some((name, value)) = header.split_once(':') else {
                return Err(format!("-H {header:?}: expected \"name: value\""));
            };
            let name = name.trim().to_ascii_lowercase();
            let value = value.trim().to_owned();
            if name.is_empty() {
                return Err(format!("-H {header:?}: expected a header name before ':'"));
            }
            if name == "host" {
                authority.get_or_insert(value);
            } else {
                headers.push((name, value));
            }
        }
        let at = match &self.at {
            Some(text) => seawall::policy::fault::parse_rfc3339(text).ok_or_else(|| {
                format!("--at {text:?}: expected an RFC 3339 time like 2026-11-22T10:00:00Z")
            })?,
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .map_err(|e| format!("the system clock is before 1970: {e}"))?,
        };
        Ok(explain::RequestSpec {
            method: self.method.to_ascii_uppercase(),
            path: self.path.clone(),
            headers,
            authority,
            route_name: self.route_name.clone(),
            cluster: self.cluster.clone(),
            client_ip: self.client_ip.clone(),
            at,
        })
    }
}

fn run_explain(args: ExplainArgs, format: Format, style: &Style) -> u8 {
    let (file, config_index) = (args.file.as_str(), args.config_index);
    let spec = match args.spec() {
        Ok(spec) => spec,
        Err(message) => {
            eprintln!("seawall: {message}");
            return EXIT_USAGE;
        }
    };
    let input = match load_input(file) {
        Ok(input) => input,
        Err(code) => return code,
    };
    let count = input.configs.len();
    let chosen = match (config_index, count) {
        (None, 1) => input.configs.into_iter().next(),
        (None, _) => {
            eprintln!(
                "seawall: {file} holds {count} plugin configs: pick one with --config N (seawall check {file} lists them)"
            );
            return EXIT_USAGE;
        }
        (Some(n), _) => input.configs.into_iter().nth(n.wrapping_sub(1)),
    };
    let Some(found) = chosen else {
        eprintln!("seawall: --config: {file} holds {count} plugin config(s)");
        return EXIT_USAGE;
    };
    let (engine, _) = match check::load(&found.json) {
        Ok(loaded) => loaded,
        Err(errors) => {
            let checked = check::Checked {
                found,
                result: Err(errors),
                warnings: Vec::new(),
            };
            match format {
                Format::Json => output::check_json(file, &[checked], &[]),
                Format::Human => output::check_human(file, &[checked], &[], style),
            }
            return EXIT_REFUSED;
        }
    };
    match explain::explain(&engine, &spec) {
        Ok(explanation) => {
            match format {
                Format::Json => output::print_json(&explanation),
                Format::Human => output::explain_human(&explanation, style),
            }
            EXIT_OK
        }
        Err(message) => {
            eprintln!("seawall: {message}");
            EXIT_USAGE
        }
    }
}
