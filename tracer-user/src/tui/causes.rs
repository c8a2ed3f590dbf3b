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
    let [causes, memory] = Layout::vertical([Constraint::Min(4), Constraint::Length(4)]).areas(area);
    draw_causes(f, causes, app);
    draw_memory(f, memory, app);
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
            "alloc: not probed (--probes all)".to_string()
        } else {
            format!("alloc {}x p99 {} max {}", alloc.count, human_ns(alloc.p99_ns), human_ns(alloc.max_ns))
        }),
    ];
    f.render_widget(Paragraph::new(lines), inner);
}
