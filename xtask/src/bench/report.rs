//! What the measurements turn into: sections of Markdown tables, and the statistics on them.
use std::fmt::Write as _;

/// One measured section of BENCHMARKS.md.
pub struct Section {
    pub title: String,
    /// How it was measured, in a sentence or two.
    pub method: String,
    /// The exact commands run, shown in a code block.
    pub commands: Vec<String>,
    pub tables: Vec<Table>,
    /// Every run's numbers, one line each, for the appendix.
    pub raw: Vec<String>,
}

pub struct Table {
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Self { header: header.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn markdown(&self) -> String {
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let mut out = line(&self.header);
        out += &line(&vec!["---".to_string(); self.header.len()]);
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

/// The whole file: `header` (title and machine), then each section, then the raw numbers.
pub fn markdown(header: &str, sections: &[Section]) -> String {
    let mut out = header.to_string();
    for (i, s) in sections.iter().enumerate() {
        let _ = write!(out, "\n## {}. {}\n\n{}\n\n", i + 1, s.title, s.method);
        if !s.commands.is_empty() {
            let _ = write!(out, "```sh\n{}\n```\n\n", s.commands.join("\n"));
        }
        for t in &s.tables {
            out += &t.markdown();
            out += "\n";
        }
    }
    out += "\n## Appendix: every run\n";
    for (i, s) in sections.iter().enumerate() {
        let _ = write!(
            out,
            "\n<details><summary>{}. {} ({} lines)</summary>\n\n```\n{}\n```\n\n</details>\n",
            i + 1,
            s.title,
            s.raw.len(),
            s.raw.join("\n")
        );
    }
    out
}

pub fn median(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 }
}

/// A distribution-free interval for the median of what `xs` sample: between the k-th smallest
/// and the k-th largest, with k the largest for which the interval holds the median with at
/// least 90% probability (n = 5: the extremes; n = 9: the 2nd of either end). NaNs where
/// there are too few samples for 90%.
pub fn median_interval(xs: &[f64]) -> (f64, f64) {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    // P(fewer than k samples fall below the median) = P(Binomial(n, 1/2) <= k - 1).
    let mut tail = 0.0;
    let mut binom = 1.0;
    let mut k = 0;
    for i in 0..n / 2 {
        tail += binom / 2f64.powi(n as i32);
        if 2.0 * tail > 0.10 {
            break;
        }
        k = i + 1;
        binom = binom * (n - i) as f64 / (i + 1) as f64;
    }
    if k == 0 { (f64::NAN, f64::NAN) } else { (v[k - 1], v[n - k]) }
}

pub fn max(xs: &[f64]) -> f64 {
    xs.iter().copied().fold(f64::NAN, f64::max)
}

/// Rounded, thousands separated: 1,234,567.
pub fn int(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", x.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if x < -0.5 { format!("-{out}") } else { out }
}

/// A value with `decimals` places, or a dash when there is none.
pub fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() { format!("{x:.decimals$}") } else { "–".into() }
}

/// `x / base` as a ratio, e.g. "0.93×".
pub fn ratio(x: f64, base: f64) -> String {
    num(x / base, 3) + "×"
}

/// Nanoseconds in a readable unit.
pub fn dur_ns(ns: f64) -> String {
    match ns.abs() {
        n if !n.is_finite() => "–".into(),
        n if n >= 1e9 => format!("{:.2} s", ns / 1e9),
        n if n >= 1e6 => format!("{:.2} ms", ns / 1e6),
        n if n >= 1e3 => format!("{:.1} µs", ns / 1e3),
        _ => format!("{ns:.0} ns"),
    }
}

/// The order of `items` in round `round`: rotated, so that no variant always runs first
/// (or last) and slow drift of the machine spreads over all of them.
pub fn rotated<T: Copy>(items: &[T], round: usize) -> Vec<T> {
    (0..items.len()).map(|i| items[(i + round) % items.len()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_formats() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(int(1234567.0), "1,234,567");
        assert_eq!(int(-1500.0), "-1,500");
        assert_eq!(rotated(&[1, 2, 3], 1), vec![2, 3, 1]);
        assert_eq!(dur_ns(1500.0), "1.5 µs");
        let xs: Vec<f64> = (1..=9).map(f64::from).collect();
        assert_eq!(median_interval(&xs[..5]), (1.0, 5.0));
        assert_eq!(median_interval(&xs), (2.0, 8.0));
        assert!(median_interval(&xs[..4]).0.is_nan());
    }
}
