//! The stall table and the detail of one stall.
use ratatui::{
    Frame,
    layout::{Constraint, Rect},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Clear, Paragraph, Row, Table, TableState, Wrap},
};

use super::{Sort, View};
use crate::{
    app::App,
    attribution::{Stall, Verdict},
    histogram::{human_bytes, human_ns},
};

/// The stalls in display order.
pub fn visible<'a>(app: &'a App, view: &View) -> Vec<&'a Stall> {
    let n = view.frozen_len.unwrap_or(app.stalls.len()).min(app.stalls.len());
    let mut v: Vec<&Stall> = app.stalls.iter().take(n).collect();
    match view.sort {
        Sort::Newest => v.reverse(),
        Sort::Longest => v.sort_by_key(|s| std::cmp::Reverse(s.duration_ns)),
        Sort::Verdict => v.sort_by(|a, b| a.verdict.cmp(&b.verdict).then(b.start_ns.cmp(&a.start_ns))),
    }
    v
}

/// What a stall's time went to, in a few characters: its largest measured component.
pub fn top_frame(s: &Stall) -> String {
    if let Some(frame) = s.top_frame() {
        return frame.to_string();
    }
    match s.verdict {
        Verdict::AllocatorPurge if s.madvise.ns >= s.munmap.ns.max(s.mremap.ns) => "madvise".into(),
        Verdict::AllocatorPurge if s.munmap.ns >= s.mremap.ns => "munmap".into(),
        Verdict::AllocatorPurge => "mremap".into(),
        Verdict::OffCpu | Verdict::Syscall => s.syscalls.top.clone().unwrap_or_else(|| "-".into()),
        Verdict::AppCode => "(own code)".into(),
        Verdict::ConnectionStorm => format!("{} accepts", s.connections.accepts),
    }
}

fn verdict_color(v: Verdict) -> Color {
    match v {
        Verdict::AllocatorPurge => Color::Red,
        Verdict::OffCpu => Color::Yellow,
        Verdict::Syscall => Color::Blue,
        Verdict::AppCode => Color::Cyan,
        Verdict::ConnectionStorm => Color::Magenta,
    }
}

pub fn draw_table(f: &mut Frame, area: Rect, app: &App, view: &View) {
    let stalls = visible(app, view);
    let origin = app.stalls.front().map_or(0, |s| s.start_ns);
    let rows = stalls.iter().map(|s| {
        Row::new(vec![
            Cell::from(format!("+{:.1}s", s.start_ns.saturating_sub(origin) as f64 / 1e9)),
            Cell::from(human_ns(s.duration_ns)),
            Cell::from(s.verdict.as_str()).style(Style::default().fg(verdict_color(s.verdict))),
            Cell::from(format!("{:.0}%", s.explained_pct)),
            Cell::from(s.tid.to_string()),
            Cell::from(top_frame(s)),
        ])
    });
    let header = Row::new(["time", "duration", "verdict", "expl", "tid", "top"])
        .style(Style::default().add_modifier(Modifier::BOLD));
    let widths = [
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(16),
        Constraint::Length(5),
        Constraint::Length(8),
        Constraint::Min(8),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::bordered().title(format!(" Stalls ({} shown) ", stalls.len())))
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED));
    let mut state = TableState::default().with_selected((!stalls.is_empty()).then_some(view.selected));
    f.render_stateful_widget(table, area, &mut state);
}

pub fn draw_detail(f: &mut Frame, screen: Rect, app: &App, view: &View) {
    let stalls = visible(app, view);
    let Some(s) = stalls.get(view.selected) else { return };
    let area = centered(screen, 76, 30);
    f.render_widget(Clear, area);
    let block = Block::bordered().title(format!(" stall on {} [{}], Esc closes ", s.comm, s.tid));
    f.render_widget(Paragraph::new(detail_lines(s)).block(block).wrap(Wrap { trim: false }), area);
}

fn detail_lines(s: &Stall) -> Vec<Line<'static>> {
    let pct = |v: f64| format!("{v:>5.1}%");
    let mut lines = vec![
        Line::from(format!("duration {}  verdict {}  explains {:.1}%", human_ns(s.duration_ns), s.verdict.as_str(), s.explained_pct)),
        Line::from(""),
        Line::from(format!("{} allocator_purge", pct(s.shares.allocator_purge))),
        Line::from(format!("        madvise {} in {} calls, {}", human_ns(s.madvise.ns), s.madvise.calls, human_bytes(s.madvise.bytes))),
        Line::from(format!("        munmap  {} in {} calls, {}", human_ns(s.munmap.ns), s.munmap.calls, human_bytes(s.munmap.bytes))),
        Line::from(format!("        mremap  {} in {} calls, {} released", human_ns(s.mremap.ns), s.mremap.calls, human_bytes(s.mremap.bytes))),
        Line::from(format!("        allocator {}", s.alloc.describe().unwrap_or_else(|| "0ns".into()))),
        Line::from(format!(
            "{} off_cpu: blocked {}, runnable {}",
            pct(s.shares.off_cpu),
            human_ns(s.off_cpu.blocked_ns),
            human_ns(s.off_cpu.runnable_ns)
        )),
        Line::from(format!("{} syscall: {} on CPU (sampled)", pct(s.shares.syscall), human_ns(s.syscalls.ns))),
    ];
    if s.connections.calls > 0 {
        lines.push(Line::from(format!(
            "{} connection_storm: {} in {} calls, {} accepted",
            pct(s.shares.connection_storm),
            human_ns(s.connections.ns),
            s.connections.calls,
            s.connections.accepts
        )));
    }
    for (name, ns) in &s.syscalls.by_name {
        lines.push(Line::from(format!("        {name} {} (wall)", human_ns(*ns))));
    }
    lines.push(Line::from(format!("{} app_code: {}", pct(s.shares.app_code), human_ns(s.app_code_ns))));
    if let Some(net) = &s.net {
        lines.push(Line::from(format!(
            "net: {} overflows, {} new conns during; {} overflows, {} new conns in the 500ms after",
            net.during.overflows, net.during.new_connections, net.after.overflows, net.after.new_connections
        )));
    }
    if let Some(w) = s.stacks.first() {
        lines.push(Line::from(format!("stack ({} of stall time, {}), leaf last:", human_ns(w.weight_ns), w.kind)));
        let shown = w.frames.iter().filter(|f| !f.starts_with("[k] ")).collect::<Vec<_>>();
        for f in &shown[shown.len().saturating_sub(12)..] {
            lines.push(Line::from(format!("  {f}")));
        }
    }
    lines
}

fn centered(screen: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(screen.width);
    let h = height.min(screen.height);
    Rect { x: screen.x + (screen.width - w) / 2, y: screen.y + (screen.height - h) / 2, width: w, height: h }
}
