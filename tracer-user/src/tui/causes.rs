//! The side panel: what stalls were blamed on, and what the allocator handed back.
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::{Color, Style},
    text::{Line, Span},
    widgets::{Block, Paragraph},
};

use crate::{
    app::App,
    histogram::{human_bytes, human_ns},
};

pub fn draw(f: &mut Frame, area: Rect, app: &App) {
    let listeners = if app.listeners.is_empty() { 0 } else { 2 * app.listeners.len().min(2) as u16 + 3 };
    let [causes, net, memory] =
        Layout::vertical([Constraint::Min(3), Constraint::Length(listeners), Constraint::Length(4)]).areas(area);
    draw_causes(f, causes, app);
    draw_listeners(f, net, app);
    draw_memory(f, memory, app);
}

/// One line per listener: accept queue, overflows, and a connection-rate sparkline.
fn draw_listeners(f: &mut Frame, area: Rect, app: &App) {
    if area.height == 0 {
        return;
    }
    let block = Block::bordered().title(" Listeners: queue, overflows, conns/100ms ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let mut lines = Vec::new();
    for l in app.listeners.iter().take(2) {
        let style = Style::default().fg(if l.overflows > 0 { Color::Red } else { Color::Green });
        lines.push(Line::from(format!("{} q {}/{} ovf {}", l.name, l.queue, l.backlog, l.overflows)));
        let rates = &l.rates[l.rates.len().saturating_sub(inner.width as usize)..];
        lines.push(Line::from(Span::styled(sparkline(rates), style)));
    }
    lines.push(Line::from(match app.storms.last() {
        Some(s) => format!("{} storms, last {}/s {}", app.storms.len(), s.peak_rate, cause_text(s)),
        None => "no connection storms".to_string(),
    }));
    f.render_widget(Paragraph::new(lines), inner);
}

fn cause_text(s: &crate::net::storm::Storm) -> String {
    match &s.stall {
        Some(st) => format!("({} stall)", human_ns(st.duration_ns)),
        None => "(external)".into(),
    }
}

fn sparkline(values: &[u64]) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    values.iter().map(|&v| if v == 0 { ' ' } else { BARS[((v * 7) / max) as usize] }).collect()
}

fn draw_causes(f: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(" Stall causes ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let total = app.stall_count().max(1);
    let bar_width = (inner.width as usize).saturating_sub(22);
    let lines: Vec<Line> = if app.by_verdict.is_empty() {
        vec![Line::from("no stalls yet")]
    } else {
        app.by_verdict
            .iter()
            .map(|(verdict, n)| {
                let len = (*n as usize * bar_width).div_ceil(total as usize);
                Line::from(vec![
                    Span::raw(format!("{:<16}{:>5} ", verdict.as_str(), n)),
                    Span::styled("■".repeat(len), Style::default().fg(Color::Magenta)),
                ])
            })
            .collect()
    };
    f.render_widget(Paragraph::new(lines), inner);
}

fn draw_memory(f: &mut Frame, area: Rect, app: &App) {
    let block = Block::bordered().title(" Memory handed back ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let purge = app.combined(|t| &t.purge).percentiles();
    let alloc = app.combined(|t| &t.alloc).percentiles();
    let lines = vec![
        Line::from(format!(
            "purge {}x p99 {} max {} {}",
            purge.count,
            human_ns(purge.p99_ns),
            human_ns(purge.max_ns),
            human_bytes(app.purge_bytes())
        )),
        Line::from(if alloc.count == 0 {
            // Sampled mode: no call is timed, only stall time found inside the allocator.
            let sampled: u64 = app.stalls.iter().map(|s| s.alloc.ns).sum();
            format!("alloc ~{} in stalls", human_ns(sampled))
        } else {
            format!("alloc {}x p99 {} max {}", alloc.count, human_ns(alloc.p99_ns), human_ns(alloc.max_ns))
        }),
    ];
    f.render_widget(Paragraph::new(lines), inner);
}
