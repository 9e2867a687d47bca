//! Emulated network paths for the lab runs: the options `cargo xtask demo` passes through to
//! every `baton-load` it starts (baton-load's `--rtt`, `--loss`, ...: a client-side impairment of
//! each connection's UDP socket, `loadgen/src/impair.rs`, since the lab kernel has no netem), and
//! the small parsers the stall bench needs for its `--rtt` / `--loss` lists.
use anyhow::{Result, bail};

const HEADING: &str = "Emulated path (baton-load's client-side impairment, both directions)";

/// `cargo xtask demo --rtt 40ms --loss 1% ...`: handed to baton-load as they are (it checks them).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PathOptions {
    /// Round-trip time added at the client, half each way (e.g. 40ms).
    #[arg(long, value_name = "DURATION", help_heading = HEADING)]
    pub rtt: Option<String>,
    /// One-way delay of what the client sends (overrides half of --rtt).
    #[arg(long, value_name = "DURATION", help_heading = HEADING)]
    pub delay_up: Option<String>,
    /// One-way delay of what the client receives (overrides half of --rtt).
    #[arg(long, value_name = "DURATION", help_heading = HEADING)]
    pub delay_down: Option<String>,
    /// Random extra delay per datagram, uniform from 0 to this (e.g. 2ms).
    #[arg(long, value_name = "DURATION", help_heading = HEADING)]
    pub jitter: Option<String>,
    /// Share of datagrams lost at random, each direction (e.g. 1%).
    #[arg(long, value_name = "PERCENT", help_heading = HEADING)]
    pub loss: Option<String>,
    /// Loss of what the client sends (overrides --loss).
    #[arg(long, value_name = "PERCENT", help_heading = HEADING)]
    pub loss_up: Option<String>,
    /// Loss of what the client receives (overrides --loss).
    #[arg(long, value_name = "PERCENT", help_heading = HEADING)]
    pub loss_down: Option<String>,
    /// Share of datagrams held back by --reorder-delay so later ones overtake them (e.g. 1%).
    #[arg(long, value_name = "PERCENT", help_heading = HEADING)]
    pub reorder: Option<String>,
    /// How long a reordered datagram is held back (baton-load's default: 5ms).
    #[arg(long, value_name = "DURATION", help_heading = HEADING)]
    pub reorder_delay: Option<String>,
    /// Seed of the path's random decisions (default: random, printed by baton-load).
    #[arg(long, value_name = "N", help_heading = HEADING)]
    pub impair_seed: Option<u64>,
}

impl PathOptions {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let opt = |flag: &'static str, v: &Option<String>| v.clone().map(|v| (flag, v));
        [
            opt("--rtt", &self.rtt),
            opt("--delay-up", &self.delay_up),
            opt("--delay-down", &self.delay_down),
            opt("--jitter", &self.jitter),
            opt("--loss", &self.loss),
            opt("--loss-up", &self.loss_up),
            opt("--loss-down", &self.loss_down),
            opt("--reorder", &self.reorder),
            opt("--reorder-delay", &self.reorder_delay),
            self.impair_seed.map(|s| ("--impair-seed", s.to_string())),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// baton-load's arguments for this path (none when nothing is asked).
    pub fn load_args(&self) -> Vec<String> {
        self.pairs()
            .into_iter()
            .flat_map(|(f, v)| [f.to_string(), v])
            .collect()
    }

    /// `baton-path`'s arguments for this path (the relay in front of clients that are not ours),
    /// or an error naming the options it cannot emulate.
    pub fn relay_args(&self) -> Result<Vec<String>> {
        let mut args = Vec::new();
        let mut unsupported = Vec::new();
        for (flag, v) in self.pairs() {
            match flag {
                "--rtt" | "--jitter" | "--loss" => args.extend([flag.to_string(), v]),
                "--impair-seed" => args.extend(["--seed".to_string(), v]),
                _ => unsupported.push(flag),
            }
        }
        if !unsupported.is_empty() {
            bail!(
                "{} cannot be emulated for HTTP/3 clients (baton-path, the relay in front of them, \
                 takes --rtt, --jitter, --loss and --impair-seed)",
                unsupported.join(", ")
            );
        }
        Ok(args)
    }

    /// Fails on a value baton-load would refuse, before anything is started.
    pub fn check(&self) -> Result<()> {
        for (flag, v) in self.pairs() {
            let ok = match flag {
                "--impair-seed" => Ok(0.0),
                "--loss" | "--loss-up" | "--loss-down" | "--reorder" => parse_pct(&v),
                _ => parse_ms(&v),
            };
            ok.map_err(|e| anyhow::anyhow!("{flag}: {e}"))?;
        }
        Ok(())
    }

    /// `--rtt 40ms --loss 1%`, or `None` on the lab's own path.
    pub fn flags(&self) -> Option<String> {
        let args = self.load_args();
        (!args.is_empty()).then(|| args.join(" "))
    }
}

/// `0.1ms`, `20ms`, `1s`, `500us` or `0`, in milliseconds.
pub fn parse_ms(text: &str) -> Result<f64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let Ok(v) = num.parse::<f64>() else {
        bail!("{text:?} is not a duration (e.g. 20ms)");
    };
    let ms = match unit {
        // A plain number would be seconds to baton-load: ask for the unit.
        "" if v == 0.0 => 0.0,
        "" => bail!("{text:?}: give the unit (e.g. {text}ms)"),
        "ms" => v,
        "us" => v / 1000.0,
        "s" => v * 1000.0,
        _ => bail!("{text:?}: unknown unit (use us, ms or s)"),
    };
    Ok(ms)
}

/// `1%`, `0.5%` or a plain number of percent, in percent (0 to 100).
pub fn parse_pct(text: &str) -> Result<f64> {
    let t = text.trim();
    match t.strip_suffix('%').unwrap_or(t).trim().parse::<f64>() {
        Ok(v) if (0.0..=100.0).contains(&v) => Ok(v),
        _ => bail!("{text:?} is not a percentage from 0 to 100 (e.g. 1%)"),
    }
}

/// `12.5` for 12.5, `20` for 20.0, `0.1` for 0.1.
pub fn num(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_passes_through() {
        assert_eq!(parse_ms("0.1ms").unwrap(), 0.1);
        assert_eq!(parse_ms("200ms").unwrap(), 200.0);
        assert_eq!(parse_ms("1s").unwrap(), 1000.0);
        assert_eq!(parse_ms("0").unwrap(), 0.0);
        assert!(parse_ms("50").is_err());
        assert!(parse_ms("fast").is_err());
        assert_eq!(parse_pct("1%").unwrap(), 1.0);
        assert_eq!(parse_pct("0").unwrap(), 0.0);
        assert!(parse_pct("200%").is_err());
        assert_eq!(num(0.1), "0.1");
        assert_eq!(num(20.0), "20");
        let p = PathOptions {
            rtt: Some("40ms".into()),
            loss: Some("1%".into()),
            impair_seed: Some(3),
            ..Default::default()
        };
        assert_eq!(
            p.load_args(),
            ["--rtt", "40ms", "--loss", "1%", "--impair-seed", "3"]
        );
        assert_eq!(p.flags().unwrap(), "--rtt 40ms --loss 1% --impair-seed 3");
        assert_eq!(PathOptions::default().flags(), None);
        assert!(p.check().is_ok());
        let bad = PathOptions {
            loss: Some("lots".into()),
            ..Default::default()
        };
        assert!(bad.check().is_err());
    }

    #[test]
    fn the_relay_takes_what_it_can_emulate_and_names_the_rest() {
        let p = PathOptions {
            rtt: Some("40ms".into()),
            jitter: Some("2ms".into()),
            loss: Some("1%".into()),
            impair_seed: Some(3),
            ..Default::default()
        };
        assert_eq!(
            p.relay_args().unwrap(),
            [
                "--rtt", "40ms", "--jitter", "2ms", "--loss", "1%", "--seed", "3"
            ]
        );
        assert!(PathOptions::default().relay_args().unwrap().is_empty());
        let asymmetric = PathOptions {
            delay_up: Some("5ms".into()),
            reorder: Some("1%".into()),
            ..Default::default()
        };
        let e = asymmetric.relay_args().unwrap_err().to_string();
        assert!(e.contains("--delay-up, --reorder"), "{e}");
    }
}
