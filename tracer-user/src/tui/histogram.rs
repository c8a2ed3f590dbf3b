//! The iteration-latency panel: percentiles and log2 bars for the target's loop threads.
use ratatui::{
    Frame,
    layout::Rect,
    style::{Color, Style},
    text::Line,
    widgets::{Block, Paragraph},
};

use crate::{app::App, histogram::human_ns};

/// The panel for one loop thread (`thread`: an index into the App's threads), or all of them.
pub fn draw(f: &mut Frame, area: Rect, app: &App, thread: Option<usize>) {
    let (hist, who) = match thread.and_then(|i| app.threads.get(i)) {
        Some(t) => (t.iter.clone(), format!("thread {} {}", t.tid, t.comm)),
        None => {
            let n = app.threads.len();
            (app.combined(|t| &t.iter), format!("{n} thread{}", if n == 1 { "" } else { "s" }))
        }
    };
    let p = hist.percentiles();
    let title = format!(" Iteration latency, {who}: {} iterations ", p.count);
    let block = Block::bordered().title(title);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let mut lines = vec![Line::from(format!(
        "p50 {} p99 {} p99.9 {} max {}",
        human_ns(p.p50_ns),
        human_ns(p.p99_ns),
        human_ns(p.p999_ns),
        human_ns(p.max_ns)
    ))];
    lines.extend(bars(&hist.log2_rows(), inner.width, inner.height.saturating_sub(1) as usize, app.threshold_ns));
    f.render_widget(Paragraph::new(lines), inner);
}

/// The busiest `height` consecutive log2 rows as horizontal bars; rows at or past the
/// threshold are red.
fn bars(rows: &[u64], width: u16, height: usize, threshold_ns: u64) -> Vec<Line<'static>> {
    let (Some(lo), Some(hi)) = (rows.iter().position(|&c| c > 0), rows.iter().rposition(|&c| c > 0)) else {
        return vec![Line::from("waiting for the first iteration...")];
    };
    // Keep the slowest rows in view: they are the point of the panel.
    let start = lo.max((hi + 1).saturating_sub(height));
    let max = rows[start..=hi].iter().copied().max().unwrap_or(1).max(1);
    let label_width = 18usize;
    let bar_width = (width as usize).saturating_sub(label_width + 1).max(1);
    (start..=hi)
        .map(|i| {
            let len = (rows[i] as usize * bar_width).div_ceil(max as usize);
            let color = if (1u64 << i) >= threshold_ns { Color::Red } else { Color::Green };
            Line::from(vec![
                ratatui::text::Span::raw(format!("{:>8} {:>8} ", human_ns(1 << i), rows[i])),
                ratatui::text::Span::styled("█".repeat(len), Style::default().fg(color)),
            ])
        })
        .collect()
}
